# The two commands of the README: `make demo` and `make test`. Both create .venv when it is
# missing; the torch and torchvision pins live in pyproject.toml only.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/digits.yaml
PYTEST_ARGS ?=

EXPERIMENT ?= digits

.PHONY: demo test report browser install install-dev clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(BIN)/cvdd run --config $(CONFIG)

report: $(VENV)/.installed-dev
	$(BIN)/cvdd report $(EXPERIMENT)

test: $(VENV)/.installed-dev browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Debian's chromium for tests/test_browser.py; Playwright drives it, no browser is downloaded.
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

clean-venv:
	rm -rf $(VENV)
