# Developer entry points. `make test` is what CI runs (through .ci/run).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Touched after a successful install; the venv is rebuilt only when pyproject.toml changes.
STAMP := $(VENV)/.installed

.PHONY: venv run test lint typecheck unit integration docs bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar off -e '.[test]'
	touch $@

run: venv
	$(VENV)/bin/preforkd -c etc/preforkd.yaml

test: lint typecheck
	$(VENV)/bin/pytest -q -ra

lint: venv
	$(VENV)/bin/ruff check prefork tests bench/run bench/overhead bench/upgrade bench/proxied bench/*.py

typecheck: venv
	$(VENV)/bin/mypy

unit: venv
	$(VENV)/bin/pytest -q -ra tests/unit

integration: venv
	$(VENV)/bin/pytest -q -ra tests/integration

# Written to a temporary file first so a failing generator leaves the old reference intact.
docs: venv
	$(PY) -c 'from prefork.config import settings_markdown; print(settings_markdown(), end="")' > docs/settings.md.tmp
	mv docs/settings.md.tmp docs/settings.md

bench: venv
	@if [ -e bench/run ]; then ./bench/run; else echo "bench/run does not exist yet"; fi

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache docs/settings.md.tmp
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
