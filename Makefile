# frugalflow: every target sets itself up (virtual environment + pinned dependencies).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install lint transformers5 llamacpp browser postgres team team-down demo test validate runs ui clean-runs

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

# Headless Chromium for tests/test_ui.py (the MLflow UI seen in a browser): Debian's package,
# installed with apt-get when missing and we are root; otherwise that one test is skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; \
	else \
		echo "browser: no chromium and not root with apt-get; tests/test_ui.py will be skipped"; \
	fi

# PostgreSQL server binaries for team mode (`frugalflow team up`, tests/test_team_*.py): Debian's
# package, installed with apt-get when missing and we are root. The stack runs its own cluster under
# .team/ on its own port; the package's default cluster, if the package starts one, is not used.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql; \
	else \
		echo "postgres: no PostgreSQL server binaries and not root with apt-get; install Debian's postgresql"; \
	fi

team: $(STAMP) postgres  ## team mode on this machine (PostgreSQL, S3, MLflow, Prefect, worker); see infra/README.md
	$(BIN)/frugalflow team up

team-down: $(STAMP)
	$(BIN)/frugalflow team down

# transformers 5.x beside the pinned 4.x, for tests/test_transformers5.py (written model dirs load
# the same in both): only the packages 5.x needs at other versions, in a --target dir each, put
# first on PYTHONPATH in front of the .venv (see requirements-transformers5*.lock).
TF5 := $(VENV)/transformers5
$(TF5)/5.25/.installed: requirements-transformers5.lock $(STAMP)
	rm -rf $(TF5)/5.25 && $(BIN)/python -m pip install --quiet --no-deps --only-binary=:all: --target $(TF5)/5.25 -r $<
	touch $@
$(TF5)/5.17/.installed: requirements-transformers5.17.lock $(STAMP)
	rm -rf $(TF5)/5.17 && $(BIN)/python -m pip install --quiet --no-deps --only-binary=:all: --target $(TF5)/5.17 -r $<
	touch $@
transformers5: $(TF5)/5.25/.installed $(TF5)/5.17/.installed

# llama.cpp, the engine the GGUF export is for (tests/test_llamacpp.py, benchmarks/llamacpp.py):
# llama-cpp-python and its tools built from source (requirements-llamacpp.lock), about 10 minutes on
# 2 cores the first time on a machine; the build is cached outside the checkout (infra/llamacpp/build.sh).
LLAMACPP := $(VENV)/llamacpp/.installed
$(LLAMACPP): requirements-llamacpp.lock infra/llamacpp/build.sh $(STAMP)
	infra/llamacpp/build.sh $(BIN)/python
	touch $@
llamacpp: $(LLAMACPP)

lint: $(STAMP)          ## ruff (configured in pyproject.toml); part of `make test`
	$(BIN)/ruff check .

# Two pytest-xdist workers: much of the suite waits on servers and subprocesses (tests/conftest.py
# keeps each module, and each shared server, on one worker). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: $(STAMP) lint transformers5 llamacpp browser postgres  ## the test suite (CPU only; starts its own local servers and a headless browser)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

validate: $(STAMP)
	$(BIN)/frugalflow validate

runs: $(STAMP)
	$(BIN)/frugalflow runs

ui: $(STAMP)
	$(BIN)/frugalflow ui
