# Two commands for a fresh machine (see README.md):
#   make quickstart   set up .venv, prepare the built-in corpus, convert and train a tiny L2A model
#   make test         set up .venv if needed, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install quickstart test test-gpu bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	@$(PYTHON) -c 'import configs; configs.check_python()'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

quickstart: install
	bash scripts/quickstart.sh

# pytest exits 5 when it collects nothing: that is a broken suite, not a pass.
test: install
	@$(BIN)/python -m pytest -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$status

test-gpu: install
	$(BIN)/python -m pytest -q -m gpu

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
