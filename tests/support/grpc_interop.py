"""The official gRPC interop TestService, compiled at test time and served by real grpcio.

    pb = interop()                      # compiles ../shared/corpora/grpc/testing/*.proto once
    with interop_server() as port:      # a grpcio server on 127.0.0.1:port
        stub = pb.test_pb2_grpc.TestServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))

The protos import each other as ``src/proto/grpc/testing/*.proto`` (their
path in grpc/grpc), so compilation happens in ``tests/grpc_gen/`` (git-ignored)
under a symlinked tree with that layout; the corpus is never copied into the repo.

The servicer follows the interop spec's behaviour: payloads of the requested
size, ``response_status`` turned into the call's status, echo of
``x-grpc-test-echo-initial`` (initial metadata) and
``x-grpc-test-echo-trailing-bin`` (trailing metadata), per-response
``interval_us`` delays for streaming.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
import time
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support import REPO

CORPUS = REPO.parent / "shared" / "corpora" / "grpc" / "testing"
GEN = REPO / "tests" / "grpc_gen"
PROTOS = ("empty.proto", "messages.proto", "test.proto")

_cached: SimpleNamespace | None = None


def _compile() -> None:
    from grpc_tools import protoc

    staging = Path(tempfile.mkdtemp(prefix="grpc_gen-", dir=GEN.parent))
    try:
        include = staging / "include" / "src" / "proto" / "grpc" / "testing"
        include.mkdir(parents=True)
        for name in PROTOS:
            (include / name).symlink_to(CORPUS / name)
        out = staging / "out"
        out.mkdir()
        import grpc_tools

        well_known = Path(grpc_tools.__file__).parent / "_proto"
        args = [
            "protoc",
            f"-I{staging / 'include'}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
        ]
        args += [f"src/proto/grpc/testing/{name}" for name in PROTOS]
        if protoc.main(args) != 0:
            raise RuntimeError("grpc_tools.protoc failed on the interop protos")
        for pkg in (
            out / "src",
            out / "src" / "proto",
            out / "src" / "proto" / "grpc",
            out / "src" / "proto" / "grpc" / "testing",
        ):
            (pkg / "__init__.py").touch()
        try:
            os.rename(out, GEN)
        except OSError:
            pass  # another process won the race; its output is identical
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def interop() -> SimpleNamespace:
    """The generated modules (test_pb2, test_pb2_grpc, messages_pb2, empty_pb2)."""
    global _cached
    if _cached is not None:
        return _cached
    if not CORPUS.is_dir():
        pytest.skip(f"gRPC interop protos not found at {CORPUS}")
    pytest.importorskip("grpc_tools")
    if not (GEN / "src" / "proto" / "grpc" / "testing" / "test_pb2_grpc.py").exists():
        _compile()
    if str(GEN) not in sys.path:
        sys.path.insert(0, str(GEN))
    base = "src.proto.grpc.testing."
    _cached = SimpleNamespace(
        **{
            name: importlib.import_module(base + name)
            for name in ("empty_pb2", "messages_pb2", "test_pb2", "test_pb2_grpc")
        }
    )
    return _cached


ECHO_INITIAL = "x-grpc-test-echo-initial"
ECHO_TRAILING = "x-grpc-test-echo-trailing-bin"


def servicer_class(pb: SimpleNamespace):
    import grpc

    messages = pb.messages_pb2

    def payload(size: int):
        return messages.Payload(type=messages.COMPRESSABLE, body=b"\x00" * size)

    def echo_metadata(context) -> None:
        received = dict(context.invocation_metadata())
        if ECHO_INITIAL in received:
            context.send_initial_metadata(((ECHO_INITIAL, received[ECHO_INITIAL]),))
        if ECHO_TRAILING in received:
            context.set_trailing_metadata(((ECHO_TRAILING, received[ECHO_TRAILING]),))

    def apply_status(request, context) -> None:
        if request.HasField("response_status") and request.response_status.code != 0:
            context.abort(
                grpc.StatusCode(_status_tuple(request.response_status.code)),
                request.response_status.message,
            )

    def _status_tuple(code: int):
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status.value
        return grpc.StatusCode.UNKNOWN.value

    class TestService(pb.test_pb2_grpc.TestServiceServicer):
        def EmptyCall(self, request, context):
            echo_metadata(context)
            return pb.empty_pb2.Empty()

        def UnaryCall(self, request, context):
            echo_metadata(context)
            apply_status(request, context)
            return messages.SimpleResponse(payload=payload(request.response_size))

        def CacheableUnaryCall(self, request, context):
            return self.UnaryCall(request, context)

        def StreamingOutputCall(self, request, context):
            echo_metadata(context)
            for params in request.response_parameters:
                if params.interval_us:
                    time.sleep(params.interval_us / 1e6)
                yield messages.StreamingOutputCallResponse(payload=payload(params.size))
            apply_status(request, context)

        def StreamingInputCall(self, request_iterator, context):
            echo_metadata(context)
            total = sum(len(r.payload.body) for r in request_iterator)
            return messages.StreamingInputCallResponse(aggregated_payload_size=total)

        def FullDuplexCall(self, request_iterator, context):
            echo_metadata(context)
            for request in request_iterator:
                apply_status(request, context)
                for params in request.response_parameters:
                    if params.interval_us:
                        time.sleep(params.interval_us / 1e6)
                    yield messages.StreamingOutputCallResponse(payload=payload(params.size))

        def HalfDuplexCall(self, request_iterator, context):
            echo_metadata(context)
            requests = list(request_iterator)
            for request in requests:
                for params in request.response_parameters:
                    yield messages.StreamingOutputCallResponse(payload=payload(params.size))

    return TestService


# port -> grpc.Server, for tests that stop a server themselves (graceful shutdown).
RUNNING_SERVERS: dict = {}

MAX_MESSAGE = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]


@contextmanager
def interop_server(workers: int = 16):
    """A real grpcio server with the interop TestService on 127.0.0.1; yields its port."""
    import grpc

    pb = interop()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=CHANNEL_OPTIONS)
    pb.test_pb2_grpc.add_TestServiceServicer_to_server(servicer_class(pb)(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    RUNNING_SERVERS[port] = server
    try:
        yield port
    finally:
        RUNNING_SERVERS.pop(port, None)
        server.stop(grace=None).wait(5)


def channel_for(
    host: str,
    port: int,
    *,
    tls: tuple[bytes, str] | None = None,
    options: list[tuple[str, object]] | None = None,
    compression=None,
):
    """A channel: plaintext with prior-knowledge HTTP/2, or with ``tls=(CA PEM, server
    name)`` over TLS (ALPN h2), verifying the server's certificate for that name."""
    import grpc

    options = CHANNEL_OPTIONS + list(options or [])
    if tls is None:
        return grpc.insecure_channel(f"{host}:{port}", options=options, compression=compression)
    ca, name = tls
    return grpc.secure_channel(
        f"{host}:{port}",
        grpc.ssl_channel_credentials(root_certificates=ca),
        options=[*options, ("grpc.ssl_target_name_override", name)],
        compression=compression,
    )


def stub_for(host: str, port: int, *, tls: tuple[bytes, str] | None = None):
    """A TestService stub on a fresh channel (see ``channel_for``)."""
    pb = interop()
    channel = channel_for(host, port, tls=tls)
    return channel, pb.test_pb2_grpc.TestServiceStub(channel)
