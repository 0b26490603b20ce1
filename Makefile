# membrane: `make demo` runs the local cluster demo, `make test` the whole suite.
# Both set the machine up first (OS packages, virtualenv, bcc, kernel headers, bpffs).

VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# test modules run two at a time (pytest-xdist, a whole module per worker: module-scoped
# clusters); most of an e2e test's time is waiting on packets and propagation, not CPU
PYTEST_WORKERS ?= 2

.PHONY: setup demo test lint unit bench down clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup lint
	$(PY) -m pytest -ra -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

unit: setup
	$(PY) -m pytest -q tests/unit

bench: setup
	$(PY) bench/identity.py
	$(PY) bench/flows.py
	$(PY) bench/datapath.py
	$(PY) bench/policy.py
	$(PY) bench/policy_diff.py
	$(PY) bench/ui.py
	$(PY) bench/lb.py --services 20000
	$(PY) bench/maglev.py --services 20000
	$(PY) bench/manifests.py
	$(PY) bench/fleet.py --nodes 100,300,1000 --join-timeout 900
	$(PY) bench/overlay.py
	$(PY) -m bench.monitor
	$(PY) bench/l7.py
	$(PY) bench/l7_protocols.py
	$(PY) bench/dns.py
	$(PY) bench/soak.py --cycles 1000

down:
	$(VENV)/bin/membrane down

clean: down
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
