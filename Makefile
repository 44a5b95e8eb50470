# Two commands do all the set-up on a fresh machine (Python, pip and compilers only):
#   make run    the main job: pretrain a small BERT with DeepSpeed + tempo_ds on 2 ranks (a few minutes) and
#               print the loss, tokens/s and the activation bytes per layer saved (tempo-ds-out/ holds the run)
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
	$(VENV)/bin/tempo-ds pretrain --out tempo-ds-out --overwrite

# pytest exits 5 when it collected no test; make treats every non-zero exit as a failure.
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

.PHONY: setup run test
