"""Sans-I/O L7 protocol engines: HTTP/1.1, HTTP/2 and gRPC, Kafka, Cassandra CQL.

This package stands alone: it imports nothing from ``l7proxy`` and needs no
root, no bcc and no sockets. See ``docs/parsers.md`` and ``parsers/base.py``.
"""
