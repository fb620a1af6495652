# Every target bootstraps what it needs: the virtual environment, the package, the data.
# `make help` lists them.

PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PRESET  ?= cpu
DEVICE  ?= cpu
# make results: with ENGINE (local or ray) `rddrs sweep` computes every run of the preset first,
# and the chapters only read; COUNT overrides the preset's test images (e.g. the paper slice);
# SWEEP_ARGS go to rddrs sweep (e.g. --address auto --gpus-per-task 1 --shard-size 100)
ENGINE  ?=
COUNT   ?=
SWEEP_ARGS ?=
# keep processes x threads <= cores: MKL's threaded eigensolver collapses when oversubscribed
export OMP_NUM_THREADS ?= 2

INSTALLED := $(VENV)/.installed
MNIST     := data/MNIST/raw/t10k-labels-idx1-ubyte
# make data DATASET=fashion-mnist: Fashion-MNIST from Debian's package dataset-fashion-mnist
# (installed with apt-get where it is missing), into data/FashionMNIST/raw
DATASET   ?= mnist
FASHION   := data/FashionMNIST/raw/t10k-labels-idx1-ubyte
FASHION_PACKAGE := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
# MathJax 3 from the npm registry, unpacked where _config.yml's html_extra_path finds it
MATHJAX_VERSION ?= 3.2.2
MATHJAX_DIR := _mathjax/_static/mathjax
MATHJAX   := $(MATHJAX_DIR)/tex-chtml.js

.PHONY: help venv data train test mathjax book book-cache notebooks results fill gpu-session clean

# Chapters: light ones run in seconds and keep their executed notebook (book/NAME.ipynb, committed)
# for nbval; heavy ones take a preset and are re-executed with papermill by `make results`.
LIGHT_CHAPTERS := intro smoothing spd_metric gradient rotation cost
HEAVY_CHAPTERS := headline mnist budget claims soundness

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[book,test,cluster]'
	touch $@

venv: $(INSTALLED)  ## create .venv and install rddrs with its book, test and cluster (Ray) extras

$(MNIST): | $(INSTALLED)
	$(BIN)/rddrs data --root data

$(FASHION_PACKAGE):
	@if [ "$$(id -u)" -eq 0 ]; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y dataset-fashion-mnist || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y dataset-fashion-mnist; }; \
	else echo "Fashion-MNIST comes from Debian's package dataset-fashion-mnist: install it with" \
	  "\`apt-get install dataset-fashion-mnist\` (as root)" >&2; exit 1; fi

$(FASHION): | $(FASHION_PACKAGE) $(INSTALLED)
	$(BIN)/rddrs data --root data --dataset fashion-mnist

data: $(if $(filter fashion-mnist,$(DATASET)),$(FASHION),$(MNIST))  ## fetch MNIST (DATASET=fashion-mnist: Fashion-MNIST, from Debian's package) into data/ (torchvision layout), checksum-verified

# the three base classifiers of the paper (Gaussian augmentation at each sigma), with the
# recipe of rddrs.pipeline.train's defaults; each writes data/models/DATASET_cnn_sigmaS.{pt,pt2,json}
SIGMAS ?= 0.12 0.25 0.50
train: $(INSTALLED) data  ## retrain the models in data/models/ (sigma 0.12 0.25 0.50, DATASET; CPU: a few minutes each, up to ~10 when busy)
	for s in $(SIGMAS); do $(BIN)/rddrs train --dataset $(DATASET) --sigma $$s --device $(DEVICE) || exit 1; done

# nbval checks the light chapters' executed notebooks: every cell must run, and the cells tagged
# nbval-check-output must print what is stored
NBVAL := --nbval-lax --nbval-current-env --nbval-sanitize-with book/nbval_sanitize.cfg

# the Fashion-MNIST tests read Debian's package dataset-fashion-mnist: installed as `make data
# DATASET=fashion-mnist` does (as root, with apt-get); where that cannot be, they are skipped
test: $(INSTALLED) $(MNIST) $(MATHJAX)  ## lint and format check (ruff), then the whole test suite (the chapters' notebooks too)
	@$(MAKE) --no-print-directory $(FASHION_PACKAGE) || echo "note: without Debian's package" \
	  "dataset-fashion-mnist the tests that read Fashion-MNIST are skipped" >&2
	$(BIN)/ruff check
	$(BIN)/ruff format --check
	$(BIN)/python -m pytest $(NBVAL)

$(MATHJAX):
	@command -v npm >/dev/null || { echo "npm is needed to fetch MathJax (apt-get install npm)" >&2; exit 1; }
	rm -rf _mathjax _mathjax.tmp && mkdir -p _mathjax.tmp
	cd _mathjax.tmp && npm pack --silent mathjax@$(MATHJAX_VERSION) >/dev/null
	tar -xzf _mathjax.tmp/mathjax-$(MATHJAX_VERSION).tgz -C _mathjax.tmp
	cp _mathjax.tmp/package/LICENSE _mathjax.tmp/package/es5/
	mkdir -p $(dir $(MATHJAX_DIR))
	mv _mathjax.tmp/package/es5 $(MATHJAX_DIR)
	rm -rf _mathjax.tmp

mathjax: $(MATHJAX)  ## fetch MathJax 3 from the npm registry into _mathjax/ (offline math in the book)

book/%.ipynb: book/%.md $(INSTALLED)
	cd book && ../$(BIN)/jupytext --to ipynb $*.md && OMP_NUM_THREADS=1 ../$(BIN)/jupyter-execute --inplace $*.ipynb

notebooks: $(addprefix book/,$(addsuffix .ipynb,$(LIGHT_CHAPTERS)))  ## re-execute the light chapters into book/*.ipynb (the outputs nbval checks)

# papermill reads JSON notebooks only, hence the jupytext pipe; every chapter resumes from the
# result files already in results/$(PRESET), so an interrupted run continues where it stopped
# CHAPTERS=mnist (or claims, soundness) re-executes one heavy chapter only
CHAPTERS ?= $(HEAVY_CHAPTERS)
results: $(INSTALLED) $(MNIST)  ## re-execute the heavy chapters (CHAPTERS, default all) at PRESET (cpu|smoke|paper) on DEVICE into results/PRESET (ENGINE=local|ray: sweep first); executed notebooks: results/PRESET/notebooks/*.ipynb (jupyter lab)
	mkdir -p results/$(PRESET)/notebooks
	$(if $(ENGINE),$(BIN)/rddrs sweep --preset $(PRESET) --device $(DEVICE) --engine $(ENGINE) \
	  $(if $(COUNT),--count $(COUNT)) $(SWEEP_ARGS),)
	for ch in $(CHAPTERS); do \
	  $(BIN)/jupytext --to ipynb --output - book/$$ch.md | \
	  $(BIN)/papermill - results/$(PRESET)/notebooks/$$ch.ipynb --cwd book \
	    -p preset $(PRESET) -p device $(DEVICE) -p results_dir ../results/$(PRESET) \
	    $(if $(COUNT),-p count $(COUNT)) || exit 1; \
	done

# The book's pages are the chapters at their default parameters: the committed results of the cpu
# preset (and results/paper for the headline chapter). Another preset's pages are the notebooks that
# `make results PRESET=...` executes into results/PRESET/notebooks; PRESET does not change the book.
book: $(INSTALLED) $(MNIST) $(MATHJAX) book-cache  ## build the HTML book into _build/html from the committed results (not PRESET: see make results)
	@if [ "$(PRESET)" != cpu ]; then \
	  echo "make book builds the pages of the committed results; PRESET=$(PRESET) does not apply. Run" \
	    "make results PRESET=$(PRESET) and open results/$(PRESET)/notebooks/CHAPTER.ipynb" \
	    "(jupyter lab, or jupyter nbconvert --to html)." >&2; exit 2; fi
	$(BIN)/jupyter-book build -W -n --keep-going .

# jupyter-book's cache is keyed on each chapter's code, not on the result files it reads: after new
# rows (make fill, rddrs land) the cache and Sphinx's environment go, so every chapter runs again
BOOK_CACHE := _build/.jupyter_cache/global.db
book-cache:  ## forget the executed chapters when a result file is newer than them (make book does this)
	@if [ -f $(BOOK_CACHE) ] && [ -n "$$(find results \( -name '*.tsv' -o -name '*.json' \) -newer $(BOOK_CACHE) \
	  -print -quit 2>/dev/null)" ]; then \
	  echo "result files changed since the chapters ran: they run again"; rm -rf _build/.jupyter_cache _build/.doctrees; fi

# A short session on a bare GPU machine: a Python with torch (2.11 or later), numpy, scipy and pytest,
# no install, no network, data/MNIST/raw/t10k-* and data/models copied there (set RDDRS_SOURCE_COMMIT
# to the commit copied, for the rows' provenance). The CUDA tests, the GPU benchmark, the mechanism
# study's runs (until MECHANISM_UNTIL) and measures (until MEASURE_UNTIL), then the paper preset's
# sweep of the figure2 group until UNTIL, all in seconds after the session started; what it wrote
# under results/paper is packed into GPU_OUT/rows.tar.gz, logs beside it. Land it here with
# `rddrs land GPU_OUT/rows.tar.gz`.
GPU_OUT ?= gpu-session
UNTIL   ?= 530
MECHANISM_UNTIL ?= 300
MEASURE_UNTIL ?= 440
gpu-session:  ## on a bare GPU machine: CUDA tests, benchmark, mechanism, paper sweep until UNTIL s, rows packed (no venv)
	@start=$$(date +%s); mkdir -p $(GPU_OUT); export PYTHONPATH=src PYTHONUNBUFFERED=1; \
	left() { t=$$(( $$1 - $$(date +%s) + start )); echo $$(( t > 1 ? t : 1 )); }; \
	sweep="$(PYTHON) -m rddrs sweep --preset paper --device cuda --quiet"; \
	$(PYTHON) -m pytest -p no:cacheprovider -q tests/test_cuda.py 2>&1 | tee $(GPU_OUT)/tests.log; \
	timeout 90 $(PYTHON) benchmarks/bench_core.py --device cuda --sections 1,2 --samples 20000 --inputs 1,13 \
	  --batch-size 20000 --cert-samples 100000 2>&1 | tee $(GPU_OUT)/bench.log; \
	$$sweep --groups mechanism --until $$(left $(MECHANISM_UNTIL)) 2>&1 | tee $(GPU_OUT)/mechanism.log; \
	timeout $$(left $(MEASURE_UNTIL)) $(PYTHON) -m rddrs mechanism --preset paper --device cuda 2>&1 \
	  | tee -a $(GPU_OUT)/mechanism.log; \
	$$sweep --groups figure2 --until $$(left $(UNTIL)) 2>&1 | tee $(GPU_OUT)/sweep.log; \
	$(PYTHON) -m rddrs pack --preset paper --since $$start --out $(GPU_OUT)/rows.tar.gz

# The paper fill (rddrs fill): Figure 2's sigma 0.5 and 0.12 panels at the paper preset, image by
# image (all five paired methods), alternating the sigmas, until DEADLINE (HH:MM today, or an ISO
# date and time), at the lowest CPU priority on FILL_THREADS threads, committing each image's rows.
# Start it in the background (`make fill DEADLINE=17:30 &`); the same command resumes from the rows on disk.
DEADLINE ?=
FILL_THREADS ?= 1
FILL_PROCESSES ?= 1
FILL_SIGMAS ?= 0.5 0.12
fill: $(INSTALLED) $(MNIST)  ## the paper fill: sigma 0.5 and 0.12 of Figure 2 image by image until DEADLINE (HH:MM), nice 19
	@test -n "$(DEADLINE)" || { echo "make fill needs DEADLINE=HH:MM (or an ISO date and time)" >&2; exit 2; }
	OMP_NUM_THREADS=$(FILL_THREADS) nice -n 19 $(BIN)/rddrs fill --until "$(DEADLINE)" --threads $(FILL_THREADS) \
	  --processes $(FILL_PROCESSES) --sigmas $(FILL_SIGMAS) --commit

clean:  ## remove build output and caches (keeps .venv and data)
	rm -rf _build .pytest_cache
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
