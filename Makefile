# Two commands do all the set-up on a fresh machine (Python, pip and compilers only):
#   make run    the main job (for now: activation-memory profile of a small BERT, with and without tempo_ds)
#   make test   the test suite
# Both create or reuse the virtual environment .venv and install the pinned CPU stack into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[cpu,test]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/tempo-ds profile --arch bert --size base --seq 128 --batch 4 --dtype bf16 --tempo

# pytest exits 5 when it collected no test; make treats every non-zero exit as a failure.
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

.PHONY: setup run test
