"""What the proxy and the datapath saw: the flow log (``flowlog``) and Prometheus metrics
with the readiness endpoint (``metrics``)."""
