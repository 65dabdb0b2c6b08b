# prvr: the two commands of the README, plus helpers.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
SNAKEMAKE := $(VENV)/bin/snakemake
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export PYTHONUNBUFFERED ?= 1

.PHONY: demo test venv lint bench clean-demo

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[workflow,test]'
	@touch $@

demo: venv
	$(SNAKEMAKE) --cores all --printshellcmds
	@$(PY) -m prvr.cli show results/demo/eval/dldkdpp/test_metrics.md

test: venv
	$(PY) -m pytest -q

lint: venv
	$(SNAKEMAKE) --lint
	$(VENV)/bin/snakefmt --check Snakefile rules

bench: venv
	$(PY) bench/train_speed.py

clean-demo:
	rm -rf results/demo logs/demo benchmarks/demo
