# windtunnel: `make demo` runs the quickstart sweep, `make test` the test suite. Both install
# what they need first (a .venv with windtunnel editable; torch's CPU build where no GPU answers).
# `make clean` removes the demo's results; `make distclean` also the .venv (a reinstall: minutes).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?= -m "not slow"

.PHONY: install demo test test-all test-gpu sysdeps bench constraints clean distclean

install: $(VENV)/.installed

# torch first: with no GPU, the CPU build (torch==2.13.0, which lies on disk on the project's
# machines; elsewhere pip takes it from PyPI or the CPU index); with a GPU, the default CUDA build.
# Every other package at the version constraints.txt names (pip -c): the set the tests last passed with.
$(VENV)/.installed: pyproject.toml constraints.txt
	@echo "make: installing $(VENV): pip, torch, then windtunnel (editable) with optuna, mlflow, ray, submitit," \
	      "tokenizers, transformers, matplotlib... (pip -q prints nothing; a few minutes the first time)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if nvidia-smi -L >/dev/null 2>&1; then $(BIN)/pip install -q 'torch>=2.6'; \
	else $(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch --index-url https://download.pytorch.org/whl/cpu; fi
	$(BIN)/pip install -q -c constraints.txt -e '.[test,hf]'
	@# the executors need them (the design: Ray and Slurm placement); a resolver that dropped one is an error here
	$(BIN)/python -c "import ray, submitit, sqlalchemy, transformers, safetensors"
	touch $@

demo: install
	$(BIN)/windtunnel sweep quickstart

# System services the tests drive for real: Slurm, munge, Chromium (apt, as root). A normal user
# (not root, CI unset) installs nothing: the tests that need them are skipped, each with its reason;
# under CI=true they fail instead (tests/conftest.py `unavailable`).
sysdeps:
	@if [ "$$(id -u)" = 0 ] || [ "$${CI:-false}" = true ]; then bash .ci/setup.sh; \
	else echo "make: not root: Slurm, munge and Chromium are not installed; the tests that need them or root are skipped"; fi

test: install sysdeps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: install sysdeps
	$(BIN)/python -m pytest -m ""

test-gpu: install
	$(BIN)/python -m pytest -m gpu

bench: install
	$(BIN)/python -m windtunnel.bench.driver

# constraints.txt from this .venv (after an upgrade that `make test` passed with)
constraints: install
	{ sed -n '1,2p' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -viE '^(torch|triton|nvidia-|windtunnel)[=_-]' | grep '=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

# results/quickstart is what `make demo` writes; the .venv stays (distclean removes it too)
clean:
	rm -rf results/quickstart

distclean: clean
	rm -rf $(VENV)
