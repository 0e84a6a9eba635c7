"""Cassandra CQL v3/v4/v5: frames, v5 segments and compression (``wire``), the statement
classifier (``lexer``) and the engine that answers a denial with ``Unauthorized`` on the
request's stream (``engine``)."""
