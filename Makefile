# `make test` and `make demo` set everything up on a fresh machine: they create .venv and install the
# pinned CPU environment. On a machine with its own interpreter (e.g. a GPU box without network) pass
# PYTHON=python3: only the project is installed then (--no-deps --no-build-isolation).
VENV ?= .venv
ifeq ($(origin PYTHON), undefined)
PYTHON := $(VENV)/bin/python
SETUP := $(VENV)/.installed
else
SETUP := .external-install
endif

.PHONY: test demo bench bench-smoke gpu-check lint clean

$(VENV)/.installed: setup.py pyproject.toml requirements-dev.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r requirements-dev.txt
	# The reference implementation, for side-by-side tests and benchmarks (pure Python; it declares
	# Python >= 3.12 but runs on 3.10+). Installed, never vendored: it is CC BY-NC.
	$(VENV)/bin/python -m pip install -q --no-deps --ignore-requires-python spidr==0.2.0
	$(VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

.external-install: setup.py pyproject.toml
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

test: $(SETUP)
	$(PYTHON) -m pytest -q tests

demo: $(SETUP)
	$(PYTHON) -m spidr_fast demo

bench: $(SETUP)
	$(PYTHON) bench/run.py

bench-smoke: $(SETUP)
	$(PYTHON) bench/run.py --smoke --out $${TMPDIR:-/tmp}/spidr_fast_bench_smoke

# Everything a GPU session must measure, each step under its own time limit, ~8.5 min (510 s of step limits) on one H100:
# results + REPORT.md in OUT (bench/gpu_check.py; GPU steps are skipped, saying why, without CUDA).
OUT ?= gpu-check-results
gpu-check: $(SETUP)
	$(PYTHON) bench/gpu_check.py --out $(OUT) $(GPU_CHECK_ARGS)

lint: $(SETUP)
	$(PYTHON) -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .external-install spidr_fast/_C*.so
