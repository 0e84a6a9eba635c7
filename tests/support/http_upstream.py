"""A real aiohttp server on loopback, run in a background thread, as an upstream for tests.

Routes:
    GET/POST/PUT /echo      -> "<METHOD> <path> <body-length> <x-fleet header>"
    GET /big?mb=N           -> N MiB streamed in 64 KiB chunks
    GET /ws                 -> WebSocket echo
    any /v1/...             -> 200 "ok <path>"
It counts every request it received, so tests can prove a denied request
never reached it.
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager

from aiohttp import WSMsgType, web


class Upstream:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)

        @web.middleware
        async def count(request, handler):
            self.requests.append((request.method, request.path_qs))
            return await handler(request)

        app.middlewares.append(count)
        app.router.add_route("*", "/echo", self.echo)
        app.router.add_get("/big", self.big)
        app.router.add_get("/ws", self.ws)
        app.router.add_route("*", "/v1/{tail:.*}", self.v1)
        return app

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        fleet = request.headers.get("X-Fleet", "-")
        return web.Response(text=f"{request.method} {request.path} {len(body)} {fleet}")

    async def big(self, request: web.Request) -> web.StreamResponse:
        mb = int(request.query.get("mb", "1"))
        resp = web.StreamResponse()
        resp.content_length = mb << 20
        await resp.prepare(request)
        chunk = b"x" * 65536
        for _ in range(mb * 16):
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
        return ws

    async def v1(self, request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text=f"ok {request.path}")


@contextmanager
def http_upstream():
    upstream = Upstream()
    started = threading.Event()
    stop: asyncio.Future | None = None

    async def serve():
        nonlocal stop
        runner = web.AppRunner(upstream.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        upstream.port = site._server.sockets[0].getsockname()[1]
        stop = asyncio.get_running_loop().create_future()
        started.set()
        await stop
        await runner.cleanup()

    def thread_main():
        upstream.loop = asyncio.new_event_loop()
        upstream.loop.run_until_complete(serve())
        upstream.loop.close()

    thread = threading.Thread(target=thread_main, daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError("upstream did not start")
    try:
        yield upstream
    finally:
        upstream.loop.call_soon_threadsafe(stop.set_result, None)
        thread.join(10)
