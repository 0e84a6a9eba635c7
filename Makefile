# The two commands a newcomer needs: `make demo` and `make test`.
# Both install whatever is missing first (scripts/setup.sh is idempotent).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test bench fuzz lint conformance clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m l7proxy.demo

test: setup
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

conformance: setup
	$(PY) -m parsers.conformance

bench: setup
	$(PY) -m bench

fuzz: setup
	$(PY) -m tests.fuzz --budget 600

lint: setup
	.venv/bin/ruff check .

clean:
	$(PY) -m l7proxy cleanup || true
