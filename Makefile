# frugalflow: every target sets itself up (virtual environment + pinned dependencies).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test validate runs ui clean-runs

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	# Exact pins, no resolution: the lock is the whole environment (torch is the CPU build where
	# no CUDA is wanted; see README). --no-deps keeps pip from backtracking.
	$(BIN)/python -m pip install --quiet --no-deps -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)          ## the nightly flow once on the default recipe (SmolLM2-135M)
	$(BIN)/frugalflow run

test: $(STAMP)          ## the test suite (CPU only, no servers needed)
	$(BIN)/python -m pytest -q

validate: $(STAMP)
	$(BIN)/frugalflow validate

runs: $(STAMP)
	$(BIN)/frugalflow runs

ui: $(STAMP)
	$(BIN)/frugalflow ui
