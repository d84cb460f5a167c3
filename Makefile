# attnkit: `make bench` runs the main job on its built-in default, `make test` runs the tests.
# Both create .venv and install attnkit into it on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.attnkit-installed

.PHONY: bench test list docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch 2.13.0 is the CPU build; a plain `torch` can pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0 || $(BIN)/python -m pip install -q "torch>=2.11"
	$(BIN)/python -m pip install -q -e ".[dev,plot]"
	touch $(STAMP)

bench: $(STAMP)
	$(BIN)/attnkit bench

list: $(STAMP)
	$(BIN)/attnkit list

test: $(STAMP)
	$(BIN)/python -m pytest

# the documentation site (mkdocs.yml, docs/) into site/; --strict: a warning fails the build
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis site
