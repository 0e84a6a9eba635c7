"""The proxy: listeners, per-connection pipes, and the I/O driver."""
