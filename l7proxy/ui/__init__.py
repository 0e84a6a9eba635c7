"""The web UI (``--ui ADDR:PORT`` on ``run`` and ``firewall``): a live service map,
a flow table with filters and history, and why each flow got its verdict.

``server.py`` serves it (aiohttp, in the proxy's process); ``servicemap.py``
aggregates the map, ``flows.py`` says what a record shows, ``explain.py`` traces
a flow through the policy; ``static/`` is the page (plain JavaScript and SVG,
no build step, nothing from a CDN). See docs/ui.md.
"""
