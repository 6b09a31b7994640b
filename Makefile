# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Without a GPU take torch's CPU build (small, quick to install); with one, pip resolves the CUDA build.
CPU_TORCH ?= torch==2.13.0
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
comma := ,
PIP := $(PY) -m pip install -q --disable-pip-version-check
# The versions the suite is known to pass with (`make constraints` rewrites it from a venv that passes);
# `make test` installs from it, a user's plain `pip install .` still takes the newest. With a GPU, torch
# is left out of the pins so the machine's CUDA build stays.
CONSTRAINTS ?= constraints/ci.txt

.PHONY: demo demo-dpo test lint test-floors test-wheel install assets bench clean gpu-check constraints

$(PY):
	$(PYTHON) -m venv $(VENV)

# With a GPU the install brings the fused CUDA kernels too (Liger Kernel: the chunked loss's fused linear
# cross-entropy, RMSNorm, SwiGLU, RoPE); without one they would be dead weight (Triton, CUDA only).
EXTRAS := $(if $(HAS_GPU),kernels,)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(if $(HAS_GPU),,$(PIP) $(CPU_TORCH))
	$(PIP) -e .$(if $(EXTRAS),'[$(EXTRAS)]')
	@touch $@

$(VENV)/.installed-dev: pyproject.toml $(CONSTRAINTS) | $(PY)
	$(if $(HAS_GPU),grep -v '^torch==' $(CONSTRAINTS) > $(VENV)/constraints.txt,cp $(CONSTRAINTS) $(VENV)/constraints.txt)
	$(if $(HAS_GPU),,$(PIP) -c $(VENV)/constraints.txt $(CPU_TORCH))
	$(PIP) -c $(VENV)/constraints.txt -e '.[dev$(if $(EXTRAS),$(comma)$(EXTRAS))]'
	@touch $@

# Pin what this venv holds (after a green `make test`): every installed package but qlora itself, torch
# without its local build label (+cpu), so the same pins serve the CPU wheel and the default one.
constraints:
	@mkdir -p $(dir $(CONSTRAINTS))
	@{ echo "# Versions the test suite passes with; regenerate with 'make constraints' (pip freeze of a green venv)."; \
	  $(PY) -m pip freeze --exclude-editable --disable-pip-version-check | grep -iv '^qlora-kit[= ]' | sed -E 's/^(torch==[^+]+)\+.*/\1/'; \
	} > $(CONSTRAINTS)
	@echo "wrote $(CONSTRAINTS)"

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m qlora.demo

# Preference tuning (DPO) of the SFT demo's adapter; runs the SFT demo first when runs/demo has no adapter.
demo-dpo: $(VENV)/.installed
	test -f runs/demo/adapter/adapter_config.json || $(PY) -m qlora.train recipes/demo.yaml --overwrite
	$(PY) -m qlora.train recipes/demo-dpo.yaml --overwrite

# Rebuild the demo's committed base model and datasets from their seed (~15 min on two cores); `make demo`
# uses the committed ones and never runs this.
assets: $(VENV)/.installed
	$(PY) -m qlora.demo.pretrain --out qlora/demo/assets/base-model
	$(PY) -m qlora.demo.datasets --out qlora/demo/assets

# The lint gate (configuration in pyproject.toml): ruff's checks and its formatter, run before the tests.
lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

# The declared floors, really installed: a separate venv with exactly the versions in constraints/floors.txt
# (pip freeze is checked against it), then both demos (metrics checked) and the fast tests: about 4 minutes
# on two idle cores from scratch (95 s of it pip). torch is pinned to 2.13.0 (the CPU wheel without a GPU)
# although the code needs only torch >= 2.6: older torch is not tested here. CI runs it after `make test`.
FLOORS_VENV ?= .venv-floors
FLOORS ?= constraints/floors.txt
FPY := $(FLOORS_VENV)/bin/python
FPIP := $(FPY) -m pip install -q --disable-pip-version-check

$(FLOORS_VENV)/.installed: SHELL := /bin/bash
$(FLOORS_VENV)/.installed: pyproject.toml $(FLOORS)
	rm -rf $(FLOORS_VENV)
	$(PYTHON) -m venv $(FLOORS_VENV)
	$(if $(HAS_GPU),,$(FPIP) -c $(FLOORS) $(CPU_TORCH))
	$(FPIP) -c $(FLOORS) -e '.[dev]'
	@norm() { awk -F'==' '!/^#/ && NF==2 {n=tolower($$1); gsub(/[-_.]+/,"-",n); sub(/\+.*/,"",$$2); print n"=="$$2}' | sort; }; \
	  missing=$$(comm -23 <(norm < $(FLOORS)) <($(FPY) -m pip freeze --exclude-editable --disable-pip-version-check | norm)); \
	  if [ -n "$$missing" ]; then echo "not installed at the floor: $$missing"; exit 1; fi
	@touch $@

test-floors: SHELL := /bin/bash
test-floors: $(FLOORS_VENV)/.installed
	@out=$$(mktemp -d) && trap 'rm -rf $$out' EXIT && \
	$(FPY) -m qlora.train recipes/demo.yaml --overwrite --set output_dir=$$out/demo && \
	$(FPY) -m qlora.train recipes/demo-classify.yaml --overwrite --set output_dir=$$out/classify && \
	$(FPY) -c "import json, sys; d = json.load(open(sys.argv[1])); c = json.load(open(sys.argv[2])); \
	ok = d['eval_exact_match_after'] >= 0.5 and d['eval_loss_after'] < d['eval_loss_before'] and c['eval_accuracy_after'] >= 0.8; \
	print('floors demos:', d['eval_loss_before'], '->', d['eval_loss_after'], 'exact match', d['eval_exact_match_after'], '| classify accuracy', c['eval_accuracy_after']); \
	sys.exit(0 if ok else 'floors demos: metrics below expectations')" $$out/demo/metrics.json $$out/classify/metrics.json && \
	$(FPY) -m pytest -q -m "not slow and not gpu" -p no:cacheprovider

# The package as a user installs it: `python -m build` makes the sdist and, from it, the wheel (dist/); a fresh
# venv takes the CPU torch and then the wheel alone (-c: the versions `make test` passed with), and, outside
# the checkout (nothing of it importable), `qlora profile --model llama-3.1-8b --format json` must print what
# the checkout prints, and `qlora demo` must reach the README's figures (exact match >= 0.8, eval loss < 0.5)
# and write training.png. About 3 minutes on two idle cores (most of it pip). CI runs it after `make test`.
WHEEL_VENV ?= .venv-wheel
DIST ?= dist
WPY := env -u PYTHONPATH $(WHEEL_VENV)/bin/python  # the wheel alone: no checkout on the path
WPIP := $(WPY) -m pip install -q --disable-pip-version-check

test-wheel: SHELL := /bin/bash
test-wheel: $(VENV)/.installed-dev
	rm -rf $(DIST) $(WHEEL_VENV)
	$(PY) -m build --outdir $(DIST) . > /dev/null
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(if $(HAS_GPU),,$(WPIP) -c $(VENV)/constraints.txt $(CPU_TORCH))
	$(WPIP) -c $(VENV)/constraints.txt $(DIST)/*.whl
	@set -e; work=$$(mktemp -d); trap 'rm -rf $$work' EXIT; wheel=$(abspath $(WHEEL_VENV))/bin; \
	$(PY) -m qlora.profile --model llama-3.1-8b --format json > $$work/checkout.json; \
	cd $$work; env -u PYTHONPATH $$wheel/qlora profile --model llama-3.1-8b --format json > wheel.json; \
	cmp checkout.json wheel.json; echo "wheel: qlora profile --model llama-3.1-8b --format json is the checkout's"; \
	env -u PYTHONPATH $$wheel/qlora demo > demo.log 2>&1 || { tail -20 demo.log; exit 1; }; \
	env -u PYTHONPATH $$wheel/python -c "import json, os, sys, qlora; m = json.load(open('runs/demo/metrics.json')); \
	ok = m['eval_exact_match_after'] >= 0.8 and m['eval_loss_after'] < 0.5 and len(open('runs/demo/log.jsonl').readlines()) > 1; \
	ok = ok and os.path.getsize('runs/demo/training.png') > 0 and 'site-packages' in qlora.__file__; \
	print('wheel: qlora demo: eval loss', round(m['eval_loss_before'], 2), '->', round(m['eval_loss_after'], 2), \
	'| exact match', m['eval_exact_match_before'], '->', m['eval_exact_match_after'], '| training.png, log.jsonl'); \
	sys.exit(0 if ok else 'wheel: qlora demo below the README figures')"

# qlora vs the plain peft + bitsandbytes + Trainer recipe, same model and data (a few minutes on 2 cores;
# not part of `make test`): writes memory_reports/bench/bench.md and bench.json; on a GPU also the speed benchmark
# (benchmarks/speed.py: memory_reports/bench/cuda-<gpu>/speed.md).
bench: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_memory.py $(ARGS)
	$(if $(HAS_GPU),$(PY) benchmarks/speed.py)

# The one prepared GPU check (<= 8 min on one GPU; results under memory_reports/measured/cuda-<gpu>/):
# `make gpu-check`; `make gpu-check ARGS=--dry-run` checks its wiring on a CPU in seconds. On a machine
# without network: `make gpu-check PY=python3 GPU_CHECK_DEPS=` (see benchmarks/gpu_check.py's docstring).
GPU_CHECK_DEPS ?= $(VENV)/.installed
gpu-check: $(GPU_CHECK_DEPS)
	$(PY) benchmarks/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) $(FLOORS_VENV) $(WHEEL_VENV) $(DIST) runs .pytest_cache
