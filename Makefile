# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv lock demo test bench clean gpu-kit

# Installs come from the lock (exact versions of the `cpu,dev,me5,track` set for Python 3.11 on Linux
# x86-64), never from whatever is newest that day. `make lock` refreshes it from pyproject.toml.
LOCK := requirements/lock-py311-linux-x86_64.txt
UV_VERSION := 0.13.9
# torch's CPU build is not on PyPI: it comes from pip's find-links when this machine has one
# (PIP_FIND_LINKS, or find-links in pip's config), else from PyTorch's CPU index.
FIND_LINKS := $(or $(PIP_FIND_LINKS),$(shell $(PY) -m pip config get global.find-links 2>/dev/null))
TORCH_SOURCE = $(if $(FIND_LINKS),--find-links $(FIND_LINKS),--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
UV := $(VENV)/bin/uv

$(UV):
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q uv==$(UV_VERSION)

$(STAMP): $(LOCK) pyproject.toml | $(UV)
	$(UV) pip install -q --python $(BIN)/python $(TORCH_SOURCE) -r $(LOCK)
	$(UV) pip install -q --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

lock: | $(UV)
	$(UV) pip compile -q pyproject.toml --extra cpu --extra dev --extra me5 --extra track --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 $(TORCH_SOURCE) --upgrade-package 'torch==2.13.0+cpu' \
	  --no-header --annotation-style line -o $(LOCK)

demo: $(STAMP)
	$(BIN)/python jobs/pipeline.py --config jobs/configs/pipeline/local.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --timeout=900 --durations=15 tests

# The wheels an air-gapped Python 3.12 GPU host lacks (Ray repacked, Serve/Data/Train deps), at
# the lock's versions, into .gpu-kit/ with a MANIFEST.txt; fails above 60 MiB. README: GPU proof.
gpu-kit:
	$(PY) bench/gpu/build_kit.py --out .gpu-kit --cache .gpu-kit-cache

clean:
	rm -rf $(VENV) runs .pytest_cache
