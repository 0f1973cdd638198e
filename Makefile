# Two commands do all set-up: `make test` and `make demo` (each creates .venv/ if missing).
PY := .venv/bin/python
STAMP := .venv/.fiber_d2_installed

.PHONY: env test demo lint format

env:
	@bash scripts/setup_env.sh

test: env
	$(PY) -m pytest -q tests

demo: env
	$(PY) tools/run_demo.py

lint: env
	$(PY) -m ruff check fiber_d2 tools tests projects
	$(PY) -m black --check -l 100 fiber_d2 tools tests projects

format: env
	$(PY) -m ruff check --fix fiber_d2 tools tests projects
	$(PY) -m black -l 100 fiber_d2 tools tests projects
