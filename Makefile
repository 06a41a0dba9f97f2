# The two commands: `make run` (the main job on the embedded default) and `make test`.
# Both create .venv when it is missing and install what they need.
PY     ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= configs/demo.yaml

.PHONY: run test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch==2.13.0 (a CPU build) first where there is no CUDA; GPU machines take pyproject's range.
$(STAMP): pyproject.toml | $(BIN)/python
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install --quiet torch==2.13.0; fi
	$(BIN)/pip install --quiet -e ".[dev,postgres,delta,bench,s3]"
	@touch $(STAMP)

data/demo: | $(STAMP)
	$(BIN)/python -m pipeline make-demo-data --out data/demo

run: $(STAMP) data/demo
	$(BIN)/python -m pipeline run --config $(CONFIG)

lint: $(STAMP)
	$(BIN)/ruff check pipeline flows tests benchmarks

test: $(STAMP) lint
	$(BIN)/python -m pytest -q --durations=25

bench: $(STAMP)
	$(BIN)/python benchmarks/windows.py

clean:
	rm -rf $(VENV) outputs data/demo
