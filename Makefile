# latentrl — `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
# torch pin for the install step: 2.13.0 installs from a local CPU wheel here; an unpinned torch pulls GBs of CUDA.
TORCH ?= torch==2.13.0
EXTRAS ?= dev
ARGS ?=
# pytest worker processes for make test / test-fast (pytest-xdist; 0: one process). Each test runs one torch thread.
TEST_JOBS ?= 2
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(EXTRAS)

.DEFAULT_GOAL := help
.PHONY: help install train test test-fast bench plot evaluate clean

help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP) ## create .venv and install latentrl (editable) with torch pinned by TORCH=...

train: $(STAMP) ## run the default experiment (extra Hydra overrides: make train ARGS="env=pendulum agent=sac")
	$(PY) train.py $(ARGS)

test: $(STAMP) ## run the whole test suite, learning tests included
	$(PY) -m pytest tests -n $(TEST_JOBS) --dist worksteal $(ARGS)

test-fast: $(STAMP) ## run the tests but skip the slow learning tests
	$(PY) -m pytest tests -m "not slow" -n $(TEST_JOBS) --dist worksteal $(ARGS)

bench: ## throughput benchmark: our SAC vs stable-baselines3 SAC on HalfCheetah-v5
	$(MAKE) install EXTRAS=dev,bench
	$(VENV)/bin/python scripts/benchmark_sac.py $(ARGS)

plot: $(STAMP) ## learning curves + table: make plot ARGS="outputs/multirun/<date>/<time>"
	$(PY) scripts/plot.py $(ARGS)

evaluate: $(STAMP) ## evaluate a run/checkpoint: make evaluate ARGS="<run_dir> --episodes 10 --video out.mp4"
	$(PY) scripts/evaluate.py $(ARGS)

clean: ## remove the virtual environment and caches (keeps outputs/)
	rm -rf $(VENV) .pytest_cache src/*.egg-info
