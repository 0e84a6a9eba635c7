# The two commands a newcomer needs: `make demo` and `make test`.
# Both install whatever is missing first (scripts/setup.sh is idempotent).
PY := .venv/bin/python
PYTEST_ARGS ?=

UI ?= 127.0.0.1:9964

.PHONY: setup demo demo-ui demo-cluster ui-screenshot test check lint typecheck bench fuzz conformance clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m l7proxy.demo

# The demo with the agent's web UI on $(UI), traffic going until Ctrl-C (docs/ui.md).
demo-ui: setup
	$(PY) -m l7proxy.demo --ui $(UI)

# The same scenario across three nodes: agents, etcd and the Kubernetes API test double.
demo-cluster: setup
	$(PY) -m tests.support.demo_cluster

# Refresh docs/ui-screenshot.png from the browser test's workload.
ui-screenshot: setup
	L7PROXY_DOCS_SCREENSHOT=1 $(PY) -m pytest -q -p no:cacheprovider tests/ui/test_ui_browser.py

# The style is enforced before a single test runs: lint, format, types.
test: setup check
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

check: lint typecheck

conformance: setup
	$(PY) -m parsers.conformance

bench: setup
	$(PY) -m bench

fuzz: setup
	$(PY) -m tests.fuzz --budget 600

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

typecheck: setup
	.venv/bin/mypy

clean:
	$(PY) -m l7proxy cleanup || true
