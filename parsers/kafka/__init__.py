"""Kafka: frames (``frames``), the API table (``apis``), request decoding through kafka-python's
``kafka.protocol`` (``engine``), topic extraction for Produce and Fetch (``produce``, ``fetch``),
and native error responses in response order for denials (``deny``)."""
