# The two commands of the README. Each creates the virtual environment it needs, so both work on
# a fresh machine: `make demo` (the whole pipeline on the embedded digits dataset) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test bench clean

demo: $(VENV)/.installed
	$(BIN)/robench demo

test: $(VENV)/.installed-test
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/run_all.py

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch==2.14.1 / torchvision==0.29.1 come from the machine's local wheels where present.
	$(BIN)/python -m pip install -q -e .
	# torchattacks (the ta.* attacks; also the PGD peer in tests) with --no-deps: it pins
	# requests~=2.25.1, which would downgrade the environment; its own imports come with robench.
	$(BIN)/python -m pip install -q --no-deps torchattacks==3.5.1
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) robench-runs .pytest_cache
