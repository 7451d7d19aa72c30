# windtunnel: `make demo` runs the quickstart sweep, `make test` the test suite. Both install
# what they need first (a .venv with windtunnel editable; torch's CPU build where no GPU answers).
# `make clean` removes the demo's results; `make distclean` also the .venv (a reinstall: minutes).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?= -m "not slow"

.PHONY: install demo test test-all test-gpu sysdeps bench clean distclean

install: $(VENV)/.installed

# torch first: with no GPU, the CPU build (torch==2.13.0, which lies on disk on the project's
# machines; elsewhere pip takes it from PyPI or the CPU index); with a GPU, the default CUDA build.
$(VENV)/.installed: pyproject.toml
	@echo "make: installing $(VENV): pip, torch, then windtunnel (editable) with optuna, mlflow, ray, submitit," \
	      "tokenizers, matplotlib... (pip -q prints nothing; a few minutes the first time)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if nvidia-smi -L >/dev/null 2>&1; then $(BIN)/pip install -q 'torch>=2.6'; \
	else $(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch --index-url https://download.pytorch.org/whl/cpu; fi
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: install
	$(BIN)/windtunnel sweep quickstart

# System services the tests drive for real: Slurm, munge, Chromium (apt, as root).
sysdeps:
	bash .ci/setup.sh

test: install sysdeps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: install sysdeps
	$(BIN)/python -m pytest -m ""

test-gpu: install
	$(BIN)/python -m pytest -m gpu

bench: install
	$(BIN)/python -m windtunnel.bench.driver

# results/quickstart is what `make demo` writes; the .venv stays (distclean removes it too)
clean:
	rm -rf results/quickstart

distclean: clean
	rm -rf $(VENV)
