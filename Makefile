VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test clean
venv:
	@bash scripts/bootstrap.sh $(VENV)

demo: venv  ## the main job: train and evaluate a small MoEC model on the bundled Spanish-English corpus
	@PATH=$(abspath $(VENV))/bin:$$PATH bash scripts/demo.sh

test: venv  ## the whole test suite: style (ruff lint and format check, 120 columns), then pytest
	@$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	@PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) work
