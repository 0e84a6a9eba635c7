"""TLS without decryption: the record layer and alerts (``wire``), the strict ClientHello
reader (``hello``), the server's first record for the flow log (``server``), and the engine
that judges a connection by its ClientHello and then relays it untouched (``engine``)."""
