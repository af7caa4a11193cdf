# The two commands of the README: `make demo` and `make test`.
# torch is installed first, from the local CPU wheel, so pip never pulls a multi-GB CUDA build.
# GPU users: `make TORCH_SPEC='torch' demo`, or install their own torch into .venv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: install
	$(BIN)/mergesearch demo

# pytest exits 5 when it collected no test: that is a failure here, never a silent pass.
test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# A benchmark exits 1 when it misses a target (its MISS lines say which) and 77 when this machine lacks its
# hardware (bench_gpu.py without CUDA): skipped, said so. The first failing benchmark stops the run, named.
bench: install
	for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f; rc=$$?; \
	  if [ $$rc -eq 77 ]; then echo "skipped $$f: needs hardware this machine lacks"; \
	  elif [ $$rc -ne 0 ]; then echo "make bench: $$f failed (exit $$rc)" >&2; exit 1; fi; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
