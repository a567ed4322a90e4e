# One-command set-up and the project's entry points. `make test` is what CI runs (.ci/run).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# The CPU machines we build on have these two wheels on local disk; elsewhere pip fetches them.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-fast lint demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,quality]"
	touch $@

install: $(VENV)/.installed

# Everything, slow end-to-end checks included: what CI runs.
test: install lint
	$(PY) -m pytest -q

# The everyday loop: every test but the slow end-to-end ones (crash, distributed, fuzz, world pipeline).
test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(PY) -m ruff check spurgen tests bench

# world build only trains what the installation lacks (the world's text-to-image model, on first use).
demo: install
	$(VENV)/bin/spurgen world build
	$(VENV)/bin/spurgen demo

# make bench BENCH_ARGS='--size full --only sfsl --threads 1'
bench: install
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) spurgen-work .pytest_cache
