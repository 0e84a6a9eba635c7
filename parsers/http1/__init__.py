"""HTTP/1.1: strict framing (RFC 9112), a C parser (llhttp via httptools) and a pure-Python
twin behind one contract (``head``, ``fast``, ``reader``), and the per-connection engine
that judges each request and answers a denial with 403 (``engine``)."""
