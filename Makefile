# The two commands of the README: `make demo` and `make test`.
# Every package is installed at the version requirements.lock pins (`pip install -c`), so the suite runs on
# the same versions on every machine and every day. torch is installed first, at the locked version from the
# local CPU wheel, so pip never pulls a multi-GB CUDA build. GPU users: install their own CUDA build of the
# locked torch version into .venv first (a local label such as +cu128 satisfies the pin).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCK ?= requirements.lock
PYTEST_ARGS ?=
# Where torch comes from, if not the configured index: on Linux plain PyPI serves the multi-GB CUDA build, so a
# CPU-only machine asks for `make install TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
TORCH_INDEX ?=
# `make lock`: the fresh environment the new lock is frozen from, and the torch it starts from (the newest
# the index serves unless given: `make lock TORCH_SPEC=torch==2.14.0`).
LOCK_VENV ?= .venv-lock
TORCH_SPEC ?= torch

.PHONY: install demo test bench lock clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q -c $(LOCK) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch
	$(BIN)/pip install -q -c $(LOCK) -e '.[dev]'
	touch $@

demo: install
	$(BIN)/mergesearch demo

# pytest exits 5 when it collected no test: that is a failure here, never a silent pass. The suite runs in
# pytest-xdist workers, one per core up to TEST_WORKERS: most of its time is torch.compile's single-threaded
# Python (the merge formulas' tests), which a second core runs beside (2 cores, cold compile cache: 12.6 min, not 20).
# `make test TEST_WORKERS=1` runs it in one process.
TEST_WORKERS ?= 4
test: install
	$(BIN)/python -m pytest -n auto --maxprocesses $(TEST_WORKERS) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# A benchmark exits 1 when it misses a target (its MISS lines say which) and 77 when this machine lacks its
# hardware (bench_gpu.py without CUDA): skipped, said so. The first failing benchmark stops the run, named.
bench: install
	for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f; rc=$$?; \
	  if [ $$rc -eq 77 ]; then echo "skipped $$f: needs hardware this machine lacks"; \
	  elif [ $$rc -ne 0 ]; then echo "make bench: $$f failed (exit $$rc)" >&2; exit 1; fi; done

# Refresh the lock: the newest versions in a fresh venv, frozen into requirements.lock (pyproject.toml's floors
# raised to them by .ci/lock.py), then the whole suite on exactly that venv. A failing suite leaves the new
# lock in the working tree to fix or to drop (`git checkout requirements.lock pyproject.toml`).
lock:
	rm -rf $(LOCK_VENV)
	$(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(LOCK_VENV)/bin/pip install -q -e '.[dev]'
	$(LOCK_VENV)/bin/pip freeze --all --exclude-editable > $(LOCK_VENV)/freeze.txt
	$(LOCK_VENV)/bin/python .ci/lock.py $(LOCK_VENV)/freeze.txt
	$(MAKE) test VENV=$(LOCK_VENV)

clean:
	rm -rf $(VENV) $(LOCK_VENV) .pytest_cache build *.egg-info
