# `make test` and `make demo` work on a fresh machine: they create .venv and install what is needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned here for this environment (a local CPU wheel); the package itself asks for a range.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test demo lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev,plot,onnx,lightning,transformers,demo]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check src tests bench examples
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/ladle demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/ruff format --check src tests bench examples

bench: $(STAMP)
	$(PY) bench/save_resume.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
