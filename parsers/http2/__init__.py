"""HTTP/2 and gRPC: the engine terminates HTTP/2 on both sides with h2 (``engine``), with the
connection settings (``conn``), header-section checks and gRPC recognition (``headers``) and
per-stream state (``streams``). A denied gRPC call gets trailers-only ``grpc-status: 7``."""
