# Two commands: `make demo` (the EPI comparison on real data) and `make test`.
# Both create or reuse a virtualenv in .venv and install the project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install tunix test test-fast demo study study-screen bench multihost-demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Tunix (for epi_jax.integrations.tunix and its tests), without moving any
# installed package: google-tunix 0.1.7 itself with --no-deps (its
# safetensors<0.8 cap would downgrade transformers and three more), then its
# other requirements with every installed package pinned to its version.
TUNIX ?= google-tunix==0.1.7
TUNIX_STAMP := $(VENV)/.tunix-installed
$(TUNIX_STAMP): $(STAMP) requirements/tunix.txt
	$(PY) -m pip install --quiet --no-deps '$(TUNIX)'
	$(PY) -m pip list --format=freeze --exclude-editable > $(VENV)/installed.txt
	$(PY) -m pip install --quiet -c $(VENV)/installed.txt -r requirements/tunix.txt
	touch $@

tunix: $(TUNIX_STAMP)

# The full suite, slow tests included (they use the real model and data), and
# the Tunix integration's (tests/test_tunix.py).
# Data is prepared once up front (idempotent; skipped with a message where the
# raw files are missing) so that parallel test workers never build it concurrently.
# Whole files per worker, the most expensive first (tests/conftest.py orders them
# from tests/durations.json; xdist's own reorder, by test count, is turned off).
PYTEST_XDIST := -n 2 --dist loadfile --no-loadscope-reorder
test: install tunix
	-$(VENV)/bin/epi-jax data prepare
	$(PY) -m pytest $(PYTEST_XDIST) -q $(PYTEST_ARGS)

# The per-commit check (target 3 min idle on 2 cores; measured idle 2026-12-07: 167 s
# and 170 s, `make test` 863 s and 849 s): every test file's cheap tests, in parallel
# like `make test`; the slow ones (marked, over the per-test budget in
# tests/durations.json, or using a fixture that trains a run: tests/conftest.py) are
# left to `make test`.
test-fast: install tunix
	-$(VENV)/bin/epi-jax data prepare
	$(PY) -m pytest $(PYTEST_XDIST) -q -m "not slow" $(PYTEST_ARGS)

# `make demo`: the sequential protocol (gsm8k, then chat) and the five-task comparison,
# two seeds each, on a 2-core CPU (configs/demo.py; 26 min measured from a fresh clone:
# docs/RESULTS.md). `make demo PRESET=gpu`: configs/demo_gpu.py, three seeds, both orders,
# about an hour on one GPU. The verdicts are printed first, then again at the end.
PRESET ?= cpu
DEMO_DIR ?= runs/demo
ifeq ($(PRESET),gpu)
DEMO_CONFIG := configs/demo_gpu.py
DEMO_SEEDS := 3
DEMO_ORDERS := --both_orders=true
DEMO_METHODS := full,multi_stage,static,epi,static_clip_trainable,epi_clip_trainable
else
DEMO_CONFIG := configs/demo.py
DEMO_SEEDS := 2
DEMO_ORDERS := --both_orders=false
DEMO_METHODS := full,multi_stage,static,epi
endif
EPI := $(VENV)/bin/epi-jax
# Runs of one method share their compiled train and eval steps through JAX's
# persistent compilation cache (a later seed or method compiles nothing twice).
demo: export JAX_COMPILATION_CACHE_DIR ?= $(abspath $(DEMO_DIR))/jax_cache
demo: install
	-$(EPI) data prepare
	$(EPI) compare --config $(DEMO_CONFIG) --workdir $(DEMO_DIR)/sequential \
	  --protocol sequential --tasks gsm8k,chat --seeds $(DEMO_SEEDS) $(DEMO_ORDERS)
	$(EPI) compare --config $(DEMO_CONFIG) --workdir $(DEMO_DIR)/mixture \
	  --methods $(DEMO_METHODS) --seeds $(DEMO_SEEDS)
	$(EPI) verdicts $(DEMO_DIR)/sequential $(DEMO_DIR)/mixture

# `make study`: the sequential protocol at the largest size this 2-core CPU affords in
# about 2 hours (configs/study.py: its docstring has the arithmetic), niced so that
# other work goes on beside it. Rerun to continue: finished runs and evals are skipped,
# an interrupted run resumes from its last checkpoint. STUDY_TASKS must be
# configs/study.py's PAIR (tests/test_study.py checks it), the pair that
# `make study-screen` (full SFT's drop on the first task of every ordered pair) picks.
STUDY_DIR ?= runs/study
STUDY_TASKS := gsm8k,alpaca
STUDY_SEEDS := 3
NICE ?= nice -n 10
study: export JAX_COMPILATION_CACHE_DIR ?= $(abspath $(STUDY_DIR))/jax_cache
study: install
	-$(EPI) data prepare
	$(NICE) $(EPI) compare --config configs/study.py --workdir $(STUDY_DIR)/sequential \
	  --protocol sequential --tasks $(STUDY_TASKS) --methods full,static,epi \
	  --seeds $(STUDY_SEEDS) --both_orders=false

SCREEN_STEPS ?= 8
SCREEN_EXAMPLES ?= 32
SCREEN_TASKS ?= gsm8k,code_alpaca,logiqa,alpaca,chat
study-screen: export JAX_COMPILATION_CACHE_DIR ?= $(abspath $(STUDY_DIR))/jax_cache
study-screen: install
	-$(EPI) data prepare
	$(NICE) $(PY) benchmarks/forgetting_screen.py --config configs/study.py \
	  --workdir $(STUDY_DIR)/screen --steps_per_task $(SCREEN_STEPS) \
	  --num_examples $(SCREEN_EXAMPLES) --tasks $(SCREEN_TASKS) --config.epi.track_importance=False

clean:
	rm -rf $(VENV) .pytest_cache

# Performance suite (CPU here; on a machine with a GPU: make bench BENCH_ARGS="--device gpu").
BENCH_ARGS ?=
bench: install
	$(PY) benchmarks/run.py --out benchmarks/results.json $(BENCH_ARGS)

# N local processes x D fake CPU devices forming one multi-host run (jax.distributed + gloo).
NPROC ?= 2
NDEV ?= 4
multihost-demo: install
	scripts/launch_local.sh $(NPROC) $(NDEV) --config configs/tiny.py --workdir runs/multihost \
	  --config.data.seq_len=128 --config.data.mixture.logiqa=0.0
