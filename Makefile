# Set-up and the two commands of the README. Everything is installed into .venv by pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch (installed first, so the project's torch requirement is already met).
TORCH_SPEC ?= torch==2.13.0
OUT ?= runs/demo

.PHONY: setup demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

## demo: set up, then run the default job (right-CVaR on the 2-D task) and print the table
demo: setup
	$(VENV)/bin/tfft run tune_configs/toy2d_right.yaml --out $(OUT)

## test: set up, then run the whole test suite
test: setup
	$(PY) -m pytest -q -ra tests

clean:
	rm -rf $(VENV) runs mlflow.db .pytest_cache
