# The two set-up commands of the README:
#   make demo   create .venv, install alignloop, run the offline demo
#   make test   create .venv, install alignloop with its test extras, run the default test suite
PYTHON ?= python3
VENV ?= .venv
# torch==2.13.0 is the CPU wheel on this kind of machine (an unpinned torch pulls GBs of CUDA
# packages). With a GPU, install your own torch build into the venv first or run `make TORCH=torch`.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test test-slow

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH)" -e .
	touch $@

# DS_BUILD_OPS=0: the test extra's DeepSpeed (train.strategy=zero2|zero3) installs without compiling its CUDA ops
$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH)" -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/alignloop demo

# chromium: the browser tests drive Debian's package; installed best effort, they skip (saying why) without it
# postgresql: the feedback store tests run on it too; the local server is started if one is installed
test: $(VENV)/.installed-test
	command -v chromium >/dev/null || (command -v apt-get >/dev/null && apt-get install -y -q chromium >/dev/null 2>&1) || true
	! command -v pg_isready >/dev/null || pg_isready -q -h 127.0.0.1 || service postgresql start || true
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow" -q

test-slow: $(VENV)/.installed-test
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m slow -q
