"""Benchmarks: ``python -m bench [names...]`` (``make bench`` runs them all).

Every module here with a ``main()`` is one benchmark. It measures l7proxy
against baselines started in the same run (a direct connection, haproxy,
nginx) and writes ``bench/results/<name>.json``; ``bench.common`` has the
shared pieces (ports, processes, CPU time per request, tables).
"""
