# One-command set-up and the project's entry points. `make test` is what CI runs (.ci/run).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# The CPU machines we build on have these two wheels on local disk; elsewhere pip fetches them.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-fast test-floors lint demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,quality]"
	touch $@

install: $(VENV)/.installed

# Test files run in parallel, one per worker at a time (a file's module fixtures are built once); each worker runs
# torch on one thread (tests/conftest.py). Three workers on our 2-core machines: many tests wait on the processes
# they start, and a third worker fills those gaps (pytest 395 s against 430-490 s with two).
WORKERS ?= 3
PYTEST := $(PY) -m pytest -q -n $(WORKERS) --dist loadfile

# Everything, slow end-to-end checks included: what CI runs.
test: install lint
	$(PYTEST)

# The everyday loop: every test but the slow end-to-end ones (crash, distributed, fuzz, world pipeline, the
# 20-class run, bench subprocesses).
test-fast: install
	$(PYTEST) -m "not slow"

# Every lower bound of pyproject.toml, installed together on the oldest Python we support (pyenv's 3.10 on our
# machines), in a second environment; there tests/floors/ runs the pipeline and exchanges LoRA files with the main
# environment (the newest versions). torch 2.2 comes from PyPI: a CUDA build, about 3 GB, a minute or two.
FLOOR_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10.*/bin/python3.10) $(shell command -v python3.10))
FLOOR_VENV ?= .venv-floors

$(FLOOR_VENV)/.installed: pyproject.toml .ci/floor_pins.py
	@test -n "$(FLOOR_PYTHON)" || { echo "make test-floors: no python3.10 found; set FLOOR_PYTHON=/path/to/python3.10"; exit 1; }
	rm -rf $(FLOOR_VENV)
	$(FLOOR_PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install -q --upgrade pip
	$(PY) .ci/floor_pins.py --python 3.10 > $(FLOOR_VENV)/floors.txt
	$(FLOOR_VENV)/bin/python -m pip install -q -c $(FLOOR_VENV)/floors.txt -e . pytest
	touch $@

test-floors: install $(FLOOR_VENV)/.installed
	SPURGEN_OTHER_PYTHON=$(abspath $(PY)) $(FLOOR_VENV)/bin/python -m pytest -p no:cacheprovider tests/floors

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
	rm -rf $(VENV) $(FLOOR_VENV) spurgen-work .pytest_cache
