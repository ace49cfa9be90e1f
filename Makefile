# srdd-lightning: every target works from a fresh clone (it creates .venv when needed).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DIGITS := data/digits

.PHONY: install test test-slow test-gpu demo reproduce-table tensorboard bench clean help

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

CLASSIFIER := runs/digits/classifier.pt
$(CLASSIFIER): | $(DIGITS)/index.json
	$(BIN)/srdd classifier --data $(DIGITS) --out $(CLASSIFIER)

demo: $(STAMP) $(DIGITS)/index.json $(CLASSIFIER)  ## the main job on the built-in digits (CPU, ~10 min): tokenizer -> SRDD generator -> samples
	@echo "== [1/3] stage 1: multi-scale tokenizer -> runs/digits/tokenizer/"
	$(BIN)/srdd fit --config experiments/digits/tokenizer.yaml
	@echo "== [2/3] stage 2: SRDD generator (Markov mask; digits-FID curve in TensorBoard) -> runs/digits/srdd/"
	$(BIN)/srdd fit --config experiments/digits/srdd.yaml
	@echo "== [3/3] class-conditional samples -> runs/digits/demo-samples/"
	rm -rf runs/digits/demo-samples
	$(BIN)/srdd sample --ckpt runs/digits/srdd --out runs/digits/demo-samples --num_per_class 10
	@echo "demo finished: runs/digits/demo-samples/grid.png (row k = class k, digits 0-9);" \
	      "runs in runs/digits/{tokenizer,srdd}/ (dashboards: make tensorboard)"

DATASET ?= digits
# The rows, stages, seeds and sample counts are experiments/$(DATASET)/table.yaml; the digits need the packed data and
# the digits classifier first (the targets above), a paper dataset its packed shards and Inception weights.
reproduce-table: $(STAMP) $(if $(filter digits,$(DATASET)),$(DIGITS)/index.json $(CLASSIFIER))  ## the paper's table (results/$(DATASET)/table.md + plots); digits on the CPU, DATASET=ffhq|miniimagenet|sun397 on GPUs
	$(BIN)/python -m srdd_lightning.table --dataset $(DATASET)

tensorboard: $(STAMP)  ## dashboards of every run under runs/
	$(BIN)/tensorboard --logdir runs

bench: $(STAMP)  ## performance benchmarks (ratios, one process each)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:  ## remove runs and packed data (keeps .venv)
	rm -rf runs $(DIGITS)
