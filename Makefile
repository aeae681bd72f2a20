# Two commands on a fresh machine:  `make gate` (set up + gate the bundled registry) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup-gate setup-dev gate test bench models clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# the gate itself needs no torch: onnxruntime (the [cpu] extra), onnx, numpy, scipy, jsonschema, filelock
$(VENV)/.gate-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[cpu]"
	touch $@

# torch first, pinned: a plain `torch` requirement would pull gigabytes of CUDA wheels
$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[cpu,dev,qat]"
	touch $(VENV)/.gate-installed $@

setup-gate: $(VENV)/.gate-installed
setup-dev: $(VENV)/.dev-installed

gate: setup-gate
	$(BIN)/python -m pytest --quantgate -v -p no:cacheprovider $(PYTEST_ARGS)

# lint first: ruff and mypy --strict over the package (config in pyproject.toml), then the docs site (mkdocs.yml:
# strict, so a broken link or anchor fails), then the suite
test: setup-dev
	$(BIN)/python -m ruff check pytest_quantgate
	$(BIN)/python -m mypy pytest_quantgate
	$(BIN)/python -m mkdocs build --strict --quiet --site-dir build/site
	$(BIN)/python -m pytest -n 2 -p no:cacheprovider $(PYTEST_ARGS)

bench: setup-dev
	$(BIN)/python bench/run_all.py

models: setup-dev
	$(BIN)/python -m scripts.bundled.build_all

clean:
	rm -rf $(VENV) build *.egg-info
