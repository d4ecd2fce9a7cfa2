# The README's two commands: `make run` and `make test`.
# CUDA users: make run TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: run test test-fast lint bench demo clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first, so that the CPU build on this machine's disk is the one that satisfies the project.
$(VENV)/.torch: | $(PY)
	$(PY) -m pip install -q $(TORCH_SPEC)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test]"
	touch $@

run: $(VENV)/.installed
	$(PY) app.py --preset demo-tiny-cpu

test: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(PY) -m ruff check lora_gui tests bench app.py

bench: $(VENV)/.installed
	$(PY) -m bench

demo: $(VENV)/.installed
	$(PY) -m lora_gui.cli demo --out demo

clean:
	rm -rf $(VENV) .pytest_cache
