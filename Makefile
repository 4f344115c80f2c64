# trec: the two README commands are `make quickstart` and `make test`; both set up .venv first.
# Versions are pinned once, in requirements/ (lock.txt + cpu.txt or gpu.txt, + dev.txt for tests), installed with
# --no-deps so that torchrec never drags in the CUDA build of fbgemm-gpu on a CPU machine.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Extra package index for torch, e.g. https://download.pytorch.org/whl/cpu on machines whose pip
# would otherwise pick the multi-GB CUDA wheel of torch==2.13.0.
TORCH_INDEX ?=
PIP_EXTRA := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
PIP := $(BIN)/python -m pip --disable-pip-version-check

CPU_STAMP := $(VENV)/.trec-cpu
GPU_STAMP := $(VENV)/.trec-gpu
REQS := requirements/lock.txt pyproject.toml

# The dataset quickstart trains on; GroupLens layout (u.data, u.item, u.user).
ML100K ?= ../shared/datasets/ml-100k
QS ?= .quickstart
NPROC ?= 2

export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup setup-gpu quickstart test test-fast bench clean

setup: $(CPU_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(CPU_STAMP): $(BIN)/python $(REQS) requirements/cpu.txt requirements/dev.txt
	$(PIP) install -q $(PIP_EXTRA) --no-deps -r requirements/lock.txt -r requirements/cpu.txt -r requirements/dev.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(BIN)/trec env --brief
	@touch $@

# Optional third command, on a CUDA machine: the CUDA builds of torch, fbgemm-gpu and faiss
# (resolved with their NVIDIA runtime wheels), then the rest of the lock as on CPU.
setup-gpu: $(GPU_STAMP)

$(GPU_STAMP): $(BIN)/python $(REQS) requirements/gpu.txt requirements/dev.txt
	$(PIP) uninstall -q -y fbgemm-gpu-cpu faiss-cpu || true
	$(PIP) install -q -c requirements/lock.txt torch==2.13.0 -r requirements/gpu.txt
	$(PIP) install -q --no-deps -r requirements/lock.txt -r requirements/dev.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(BIN)/trec env --brief
	@touch $@

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# The main job end to end on MovieLens 100K (or, where that is absent, a synthetic dataset of the
# same size): prepare → 2-rank sharded training (torchx) → 2-rank FAISS export → evaluation
# through the index → one user's recommendations → `trec serve` started briefly on a free port for one
# /recommend answer. Re-running resumes/reuses what exists.
QS_DATA := $(QS)/data/$(if $(wildcard $(ML100K)/u.data),ml100k,synthetic)
QS_RUN := $(QS)/runs/two_tower
QS_EXPORT := $(QS)/exports/two_tower

quickstart: setup $(QS_DATA)/manifest.json
	torchx run -s local_cwd ./launchers/components.py:train -j 1x$(NPROC) -- \
	  --config configs/movielens_two_tower.yaml --data $(QS_DATA) --run-dir $(QS_RUN)
	torchx run -s local_cwd ./launchers/components.py:export -j 1x$(NPROC) -- \
	  --run-dir $(QS_RUN) --out $(QS_EXPORT) --overwrite --set export.index=ivf_flat
	$(BIN)/trec evaluate --run-dir $(QS_RUN) --index $(QS_EXPORT) --nprobe 8
	$(BIN)/trec search --index $(QS_EXPORT) --run-dir $(QS_RUN) --user 1 -k 10
	$(BIN)/python -m trec.serving.demo $(QS_EXPORT) 1

$(QS)/data/ml100k/manifest.json:
	$(BIN)/trec data prepare movielens --source $(ML100K) --out $(QS)/data/ml100k \
	  --split stratified --test-fraction 0.25 --val-fraction 0.1 --seed 42

$(QS)/data/synthetic/manifest.json:
	$(BIN)/trec data prepare synthetic --out $(QS)/data/synthetic --users 943 --items 1682 \
	  --interactions 100000 --split stratified --test-fraction 0.25 --val-fraction 0.1 --seed 42

clean:
	rm -rf $(QS) .pytest_cache
