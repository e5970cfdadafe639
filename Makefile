# `make test` and `make demo` work on a fresh machine: they create the virtual environments and
# install what each needs (a stamp file per environment records that it is done).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned here for this environment (a local CPU wheel); the package itself asks for a range.
# The pin goes in the same pip call as the package, so that resolving the extras cannot move it.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
LINTED := src tests bench examples scripts

# The oldest and the newest supported Python, where this machine has them: `make test` also runs
# the fast tests there (no optional extras). `make test OTHER_PYTHONS=` skips them.
OTHER_PYTHONS ?= python3.10 python3.13
other_venv = .venv$(subst .,,$(subst python,,$(1)))
# On PATH, or installed by pyenv but not selected (its shims then refuse to run it).
interpreter = $(or $(shell $(1) -c 'import sys; print(sys.executable)' 2>/dev/null),$(lastword $(wildcard $(HOME)/.pyenv/versions/*/bin/$(1))))
OTHER_VENVS := $(foreach p,$(OTHER_PYTHONS),$(if $(call interpreter,$(p)),$(call other_venv,$(p))))

# Tests run on one worker per CPU (pytest-xdist); the slowest ones mostly wait on child
# processes, so a worker that finishes early takes tests from the other (worksteal).
# `make test PARALLEL=` runs them in one process.
PARALLEL ?= -n auto --dist worksteal

.PHONY: install test test-fast demo lint bench clean

# Everything the suite needs: every extra.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)" -e ".[dev,plot,onnx,lightning,transformers,demo]"
	touch $(STAMP) $(DEMO_STAMP)

# The demo needs torch, scikit-learn and matplotlib only (not lightning, transformers or onnx).
$(DEMO_STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)" -e ".[demo]"
	touch $(DEMO_STAMP)

# One venv per other Python: torch (pinned) and the test tools.
define other_python_rule
$(call other_venv,$(1))/.installed: pyproject.toml Makefile
	test -x $(call other_venv,$(1))/bin/python || $(call interpreter,$(1)) -m venv $(call other_venv,$(1))
	$(call other_venv,$(1))/bin/python -m pip install -q --upgrade pip
	$(call other_venv,$(1))/bin/python -m pip install -q "$(TORCH_PIN)" -e ".[dev]"
	touch $$@
endef
$(foreach p,$(OTHER_PYTHONS),$(if $(call interpreter,$(p)),$(eval $(call other_python_rule,$(p)))))

install: $(STAMP)

test: $(STAMP) $(addsuffix /.installed,$(OTHER_VENVS))
	$(VENV)/bin/ruff check $(LINTED)
	$(PY) -m pytest -q $(PARALLEL)
	@for venv in $(OTHER_VENVS); do \
		echo "fast tests on $$($$venv/bin/python -V)"; \
		$$venv/bin/python -m pytest -q -m "not slow" -p no:cacheprovider $(PARALLEL) || exit 1; \
	done

# The fast tests on every Python (what a quick check before a commit runs).
test-fast: $(STAMP) $(addsuffix /.installed,$(OTHER_VENVS))
	@for venv in $(VENV) $(OTHER_VENVS); do \
		echo "fast tests on $$($$venv/bin/python -V)"; \
		$$venv/bin/python -m pytest -q -m "not slow" -p no:cacheprovider $(PARALLEL) || exit 1; \
	done

demo: $(DEMO_STAMP)
	$(VENV)/bin/ladle demo

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

bench: $(STAMP)
	$(PY) bench/save_resume.py
	$(PY) bench/cli_startup.py --checkpoints 1000

clean:
	rm -rf $(VENV) $(OTHER_VENVS) .pytest_cache .ruff_cache
