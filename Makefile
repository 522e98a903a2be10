# The README's two commands: `make run` (install + the main job) and `make test` (install + tests).
# Both are idempotent: the venv is rebuilt only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
export DVC_NO_ANALYTICS := 1
export RAY_AUTH_MODE := disabled

.PHONY: setup run test test-fast clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

run: setup
	$(BIN)/python -m pipeline info
	if [ -f dvc.yaml ]; then $(BIN)/dvc repro; fi

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean-venv:
	rm -rf $(VENV)
