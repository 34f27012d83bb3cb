# `make demo` and `make test` each set up .venv themselves (idempotently) on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Without a GPU, take the CPU build of torch (on these machines it lies on disk); with one, any recent torch.
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.4,torch==2.13.0)
PROMPT ?= a red circle on a blue background

.PHONY: demo test clean

$(STAMP): pyproject.toml Makefile requirements-dashai-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	# DashAI for the plugin tests: the real package, without its (huge) dependency tree.
	$(PY) -m pip install --quiet --no-deps dashai==0.10.0
	$(PY) -m pip install --quiet -r requirements-dashai-test.txt
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/pixart-sigma generate "$(PROMPT)" --model-name demo --seed 42 -o outputs

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) outputs
