"""A small h2c server that, unlike nghttpd, accepts the HTTP/1.1 ``Upgrade: h2c`` dance.

    with h2c_server() as port:
        ...  # GET http://127.0.0.1:port/any/path -> 200, body "h2c <path>\\n"

Prior-knowledge HTTP/2 works too. Built on the h2 library (the same
sans-I/O core real Python HTTP/2 servers use), one thread per connection,
bounded reads, loopback only. Stopped (and its threads joined) on exit.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from contextlib import contextmanager

import h2.events as ev
from h2.config import H2Configuration
from h2.connection import H2Connection

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_HEAD = 16 * 1024


def body_for(path: bytes) -> bytes:
    return b"h2c " + path + b"\n"


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(10)
        head = b""
        for _ in range(1000):
            chunk = sock.recv(4096)
            if not chunk or len(head) > MAX_HEAD:
                return
            head += chunk
            if PREFACE.startswith(head):
                continue  # could still be the HTTP/2 preface (which contains CRLFCRLF)
            if head.startswith(PREFACE) or b"\r\n\r\n" in head:
                break
        conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        if head.startswith(PREFACE):
            conn.initiate_connection()
            leftover = head
        else:
            request_head, _, leftover = head.partition(b"\r\n\r\n")
            lines = request_head.split(b"\r\n")
            fields = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(b":") for line in lines[1:])
            }
            if fields.get(b"upgrade", b"").lower() != b"h2c" or b"http2-settings" not in fields:
                sock.sendall(
                    b"HTTP/1.1 505 HTTP Version Not Supported\r\ncontent-length: 0\r\nconnection: "
                    b"close\r\n\r\n"
                )
                return
            path = lines[0].split(b" ")[1]
            sock.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
            )
            conn.initiate_upgrade_connection(fields[b"http2-settings"])
            self._respond(conn, 1, path)
        self._serve(sock, conn, leftover)

    def _respond(self, conn: H2Connection, stream_id: int, path: bytes) -> None:
        body = body_for(path)
        conn.send_headers(
            stream_id, [(b":status", b"200"), (b"content-length", str(len(body)).encode())]
        )
        conn.send_data(stream_id, body, end_stream=True)

    def _serve(self, sock: socket.socket, conn: H2Connection, data: bytes) -> None:
        for _ in range(100_000):
            if data:
                for event in conn.receive_data(data):
                    if isinstance(event, ev.RequestReceived):
                        self._respond(conn, event.stream_id, dict(event.headers)[b":path"])
                    elif isinstance(event, ev.DataReceived):
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, ev.ConnectionTerminated):
                        sock.sendall(conn.data_to_send())
                        return
            out = conn.data_to_send()
            if out:
                sock.sendall(out)
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@contextmanager
def h2c_server():
    server = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
