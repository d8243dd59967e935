# The two commands of the README. Each sets up its own environment (.venv) first.
#   make demo   the main job on the embedded default: synthetic phantoms
#   make test   the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo

.PHONY: setup demo test
setup:
	@bash Testing/setup_env.sh $(VENV)

test: setup
	$(PY) -m pytest -q

demo: setup
	bash Training/demo.sh $(VENV) $(DEMO)
