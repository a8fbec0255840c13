# The two commands of the README. Each creates the virtual environment it needs, so both work on
# a fresh machine: `make demo` (the whole pipeline on the embedded digits dataset) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test test-kernels bench clean

demo: $(VENV)/.installed
	$(BIN)/robench demo

test: $(VENV)/.installed-test
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

# The same suite on PyTorch's portable CPU kernels (ATEN_CPU_CAPABILITY=default) instead of the
# machine's own (AVX2, AVX-512): they round differently in the last bits, as another processor
# does, so a test whose tolerance only this machine's numbers meet fails here, not on a user's
# machine. .ci/run runs it after `make test`. KERNELS=avx2 (say) picks another setting; torch must
# take it (it ignores names it does not know) and it must not be the native one.
KERNELS ?= default
CAPABILITY = $(BIN)/python -c "import torch; print(torch.backends.cpu.get_cpu_capability())"

test-kernels: $(VENV)/.installed-test
	@native=$$(env -u ATEN_CPU_CAPABILITY $(CAPABILITY)); got=$$(ATEN_CPU_CAPABILITY=$(KERNELS) $(CAPABILITY)); \
	if [ "$$got" != "$$(echo '$(KERNELS)' | tr a-z A-Z)" ]; then \
		echo "error: ATEN_CPU_CAPABILITY=$(KERNELS) was not taken: torch runs $$got kernels"; exit 1; fi; \
	if [ "$$got" = "$$native" ]; then \
		echo "error: $$got is this machine's native kernel setting; pick another with KERNELS=..."; exit 1; fi; \
	echo "CPU kernels: $$got (this machine's native: $$native)"
	ATEN_CPU_CAPABILITY=$(KERNELS) OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

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
