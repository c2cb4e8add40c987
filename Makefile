# Two entry points: `make demo` (the main job on the shipped shapes model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install lint test demo clean

# torch first, pinned: `pip install torch==2.13.0` takes the local CPU wheel; the project's own
# `torch>=2.4` requirement is then already satisfied, so no CUDA build is pulled in.
# PYTHONWARNINGS drops only setuptools' InformationOnly notice that every flat-layout editable
# install prints ("Editable installation ... folders named like the package take precedence");
# real warnings, e.g. about the packaging configuration, still show.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# ruff (lint + formatting) and the import contracts of pyproject.toml ([tool.importlinter]);
# ARCHITECTURE.md explains the layers.
lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q -p no:cacheprovider

demo: install
	$(VENV)/bin/difract demo --out outputs/demo

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache .import_linter_cache
