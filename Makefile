# Every target bootstraps what it needs: the virtual environment, the package, the data.
# `make help` lists them.

PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PRESET  ?= cpu
DEVICE  ?= cpu
# keep processes x threads <= cores: MKL's threaded eigensolver collapses when oversubscribed
export OMP_NUM_THREADS ?= 2

INSTALLED := $(VENV)/.installed
MNIST     := data/MNIST/raw/t10k-labels-idx1-ubyte

.PHONY: help venv data test book clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[book,test]'
	touch $@

venv: $(INSTALLED)  ## create .venv and install rddrs with its book and test extras

$(MNIST): | $(INSTALLED)
	$(BIN)/rddrs data --root data

data: $(MNIST)  ## fetch MNIST into data/MNIST/raw (torchvision layout), checksum-verified

test: $(INSTALLED) $(MNIST)  ## run the whole test suite
	$(BIN)/python -m pytest

book: $(INSTALLED) $(MNIST)  ## build the HTML book into _build/html (preset PRESET, default cpu)
	$(BIN)/jupyter-book build -W -n --keep-going .

clean:  ## remove build output and caches (keeps .venv and data)
	rm -rf _build .pytest_cache
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
