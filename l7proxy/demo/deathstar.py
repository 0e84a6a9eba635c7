"""The Death Star's HTTP API, as in Cilium's getting-started guide (aiohttp).

Run inside the deathstar endpoint's namespace: ``python -m l7proxy.demo.deathstar --port 80``.
Each reply names the client address the server saw, which shows that the
proxy preserves the client's source address.
"""

from __future__ import annotations

import argparse

from aiohttp import web


async def request_landing(request: web.Request) -> web.Response:
    return web.Response(text=f"Ship landed (seen from {request.remote})\n")


async def exhaust_port(request: web.Request) -> web.Response:
    return web.Response(text="Panic: deathstar exploded\n", status=503)


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def app() -> web.Application:
    application = web.Application()
    application.router.add_post("/v1/request-landing", request_landing)
    application.router.add_put("/v1/exhaust-port", exhaust_port)
    application.router.add_get("/v1/", health)
    return application


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=80)
    args = parser.parse_args()
    web.run_app(
        app(),
        host=args.host,
        port=args.port,
        print=lambda *_: print("deathstar ready", flush=True),
        access_log=None,
    )


if __name__ == "__main__":
    main()
