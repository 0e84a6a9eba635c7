"""The ``http`` parser family: HTTP/1.1, with HTTP/2 (h2c) detected on the same port."""

from parsers.http1 import Http1Engine as HttpEngine

__all__ = ["HttpEngine"]
