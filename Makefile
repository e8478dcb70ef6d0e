# The two set-up commands a newcomer needs (README): `make run` and `make test`.
# Both create .venv and install everything from nothing (PyPI only).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := $(shell grep -o 'torch==[0-9.]*' pyproject.toml)
PIP    := $(PY) -m pip install --quiet --no-compile --disable-pip-version-check
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: run test install lint assets clean

# pip takes torch==2.13.0 from these machines' local wheel (uv does not look there and would
# download a CUDA build); uv then installs the rest, the same package versions pip resolves,
# in parallel: 29-33 s instead of pip's 93 s for the whole install on a 2-core CPU.
# Where uv fails (a registry it cannot reach), pip installs the rest.
# --no-compile: Python compiles what it imports, on first use.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH, or set PYTHON=..."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH) uv==0.13.9
	$(VENV)/bin/uv pip install --quiet --python $(PY) -e '.[dev]' || $(PIP) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The embedded default: Flex-KD and plain fine-tuning on mpnet -> MiniLM, Rotten Tomatoes,
# CPU-sized; then a side-by-side table of the two. A killed `make run` continues where it
# stopped when rerun; finished jobs are kept (ARGS=resume=never runs them again).
# Only one of its two jobs asks the teacher, so a teacher-output store (one teacher pass over
# the whole training split) cannot pay off here; it does in sweeps (make run STORE=auto).
RUN_DIR := outputs/default
STORE ?= off
run: $(STAMP)
	$(PY) run.py -m strategy=flexkd,sft teacher_store=$(STORE) hydra.sweep.dir=$(RUN_DIR) $(ARGS)
	$(PY) -m benchmarks.tables $(RUN_DIR)

# Two pytest-xdist workers, a test file each (--dist loadfile), sharing one session cache
# (tests/conftest.py): most of a test is a run.py subprocess, so the 2 cores overlap well.
# Tests that start processes spawn them (a forked child of a threaded worker can deadlock).
# TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check .

assets: $(STAMP)
	$(PY) -m flexkd.assets

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
