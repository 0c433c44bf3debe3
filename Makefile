# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= workdir/digits_demo

.PHONY: venv demo test test-slow bench clean

$(BIN)/activate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[cpu,test]'
	touch $(BIN)/activate

venv: $(BIN)/activate

# Adapts a frozen, pre-trained ViT to a new task on real data that ships offline.
demo: venv
	$(BIN)/python -m vadapt.main --config=configs/digits_demo.py --workdir=$(WORKDIR)

test: venv
	$(BIN)/python -m pytest -q

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

bench: venv
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) workdir
