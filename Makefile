# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Without a GPU take torch's CPU build (small, quick to install); with one, pip resolves the CUDA build.
CPU_TORCH ?= torch==2.13.0
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo test install assets bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(if $(HAS_GPU),,$(PIP) $(CPU_TORCH))
	$(PIP) -e .
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m qlora.train recipes/demo.yaml --overwrite

# Rebuild the demo's committed base model and datasets from their seed (~15 min on two cores); `make demo`
# uses the committed ones and never runs this.
assets: $(VENV)/.installed
	$(PY) -m qlora.demo.pretrain --out recipes/demo-assets/base-model
	$(PY) -m qlora.demo.datasets --out recipes/demo-assets

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

# qlora vs the plain peft + bitsandbytes + Trainer recipe, same model and data (a few minutes on 2 cores;
# not part of `make test`): writes memory_reports/bench/bench.md and bench.json.
bench: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_memory.py $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
