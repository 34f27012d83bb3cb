# `make demo` and `make test` each set up .venv themselves (idempotently) on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# Without a GPU, take the CPU build of torch (on these machines it lies on disk); with one, any recent torch.
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.4,torch==2.13.0)
PROMPT ?= a red circle on a blue background
PORT ?= 8000
# The browser tests drive Debian's Chromium (Playwright's own browser download cannot work offline).
CHROMIUM ?= /usr/bin/chromium

.PHONY: demo test serve clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[server]"
	touch $(STAMP)

# The ray extra for the Ray tests (about 750 MB, a minute). DashAI for the plugin tests: the real package
# without its (huge) dependency tree; pip then reports dashai's other requirements as missing, which these
# tests do not need.
$(TEST_STAMP): $(STAMP) requirements-dashai-test.txt
	test -x $(CHROMIUM) || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	$(PY) -m pip install --quiet -e ".[server,test,ray,int8]"
	$(PY) -m pip install --quiet --no-deps dashai==0.10.0
	$(PY) -m pip install --quiet -r requirements-dashai-test.txt
	touch $(TEST_STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/pixart-sigma generate "$(PROMPT)" --model-name demo --seed 0 -o outputs

serve: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/pixart-sigma serve --model-name demo --port $(PORT)

test: $(TEST_STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=30

clean:
	rm -rf $(VENV) outputs
