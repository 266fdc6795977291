# Two commands for a fresh machine (see README.md):
#   make quickstart   set up .venv, prepare the built-in corpus, convert and train a tiny L2A model
#   make test         set up .venv if needed, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install quickstart test test-unit test-gpu bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	@PYTHONPATH=src $(PYTHON) -c 'from l2a_common.app import check_python; check_python()'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

quickstart: install
	bash scripts/quickstart.sh

# pytest exits 5 when it collects nothing: that is a broken suite, not a pass.
test: install
	@$(BIN)/python -m pytest -q -n 2 --dist loadfile; status=$$?; \
	if [ $$status -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$status

# The unit tests only (minutes): everything but the tests that run the commands as a user does (marker e2e).
test-unit: install
	$(BIN)/python -m pytest -q -m "not e2e"

# The GPU suite, on a CUDA machine where the project is installed in the Python that has CUDA
# (`pip install -e .`; the .venv is used when there is one).
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
test-gpu:
	$(GPU_PYTHON) -m pytest -q -m gpu tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
