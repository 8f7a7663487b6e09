# Everything a fresh machine needs goes through these targets (README: `make demo`, `make test`).
# A project-local virtual environment keeps the machine's Python untouched.
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
# Fast suite: no zoo downloads, no GPU, no long statistical runs.
PYTEST_ARGS ?= -m "not zoo and not slow and not gpu"

.PHONY: install test lint format ctest pytest test-zoo test-gpu demo clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade "pip>=24" setuptools wheel ninja

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on this machine.
$(VENV)/.installed: $(PY) pyproject.toml setup.py $(shell find csrc -type f 2>/dev/null)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install --no-build-isolation -e ".[test]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check ivl tests benchmarks setup.py
	$(VENV)/bin/ruff format --check ivl tests benchmarks setup.py

format: install
	$(VENV)/bin/ruff check --fix ivl tests benchmarks setup.py
	$(VENV)/bin/ruff format ivl tests benchmarks setup.py

# The framework-free kernel core, built and tested without torch.
ctest:
	cmake -S . -B build/core -DCMAKE_BUILD_TYPE=Release
	cmake --build build/core -j 2
	ctest --test-dir build/core --output-on-failure

pytest: install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test: lint ctest pytest

test-zoo: install
	$(VENV)/bin/pytest -m zoo

test-gpu: install
	$(VENV)/bin/pytest -m gpu

demo: install
	$(VENV)/bin/ivl demo

clean:
	rm -rf build $(VENV) *.egg-info ivl/_C*.so
