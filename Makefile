# srdd-lightning: every target works from a fresh clone (it creates .venv when needed).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DIGITS := data/digits

.PHONY: install test test-slow test-gpu demo tensorboard bench clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with its test tools

test: $(STAMP)  ## the fast test suite (CPU, a few minutes)
	$(BIN)/python -m pytest

test-slow: $(STAMP)  ## the tests marked slow (long CPU training runs)
	$(BIN)/python -m pytest -m slow

test-gpu: $(STAMP)  ## the tests marked gpu (needs CUDA)
	$(BIN)/python -m pytest -m gpu

$(DIGITS)/index.json: | $(STAMP)
	$(BIN)/srdd data digits --out $(DIGITS)

demo: $(STAMP) $(DIGITS)/index.json  ## the main job on the built-in digits, on the CPU
	$(BIN)/srdd fit --config experiments/digits/smoke.yaml
	@echo "demo finished: run folder runs/digits/smoke/ (TensorBoard: make tensorboard)"

tensorboard: $(STAMP)  ## dashboards of every run under runs/
	$(BIN)/tensorboard --logdir runs

bench: $(STAMP)  ## performance benchmarks (ratios, one process each)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:  ## remove runs and packed data (keeps .venv)
	rm -rf runs $(DIGITS)
