# The README's two commands: `make run` and `make test`.
# CUDA users: make run TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
CHROMIUM ?= chromium

.PHONY: run test test-fast chromium lint bench demo clean

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

# The browser tests need Debian's chromium: `make test` installs it when it is missing and it can
# (root with apt-get), else it stops with a sentence, so that no browser test is skipped silently.
# `make test-fast` is the explicit way to skip the slow and browser tests.
test: $(VENV)/.installed-test chromium
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -m "not slow and not browser" $(PYTEST_ARGS)

CHROMIUM_HELP := make test needs Debian's chromium for the browser tests: install it with \
	'sudo apt-get install chromium' (or run 'make test-fast' to skip the slow and browser tests).

chromium:
	@if ! command -v $(CHROMIUM) >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing Debian's chromium for the browser tests (apt-get) ..."; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
	      || { echo "Installing chromium with apt-get failed. $(CHROMIUM_HELP)" >&2; exit 1; }; \
	  else \
	    echo "$(CHROMIUM_HELP)" >&2; exit 1; \
	  fi; \
	fi
	@command -v $(CHROMIUM) >/dev/null 2>&1 || { echo "chromium is still missing. $(CHROMIUM_HELP)" >&2; exit 1; }

lint: $(VENV)/.installed-test
	$(PY) -m ruff check lora_gui tests bench app.py

bench: $(VENV)/.installed
	$(PY) -m bench

demo: $(VENV)/.installed
	$(PY) -m lora_gui.cli demo --out demo

clean:
	rm -rf $(VENV) .pytest_cache
