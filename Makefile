# The two commands of the README: `make demo` and `make test`. Each sets itself up from nothing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test docs bench-cpu bench-gpu compile-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel "cython>=3.0" numpy

$(STAMP): $(PY) setup.py pyproject.toml $(wildcard cpu/*.cpp cpu/*.hpp cpu/*.pyx cpu/*.pxd)
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench,docs]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pysparse_attn demo

test: $(STAMP)
	$(PY) -m pytest -n auto -p no:cacheprovider tests

docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html
	$(PY) -m sphinx -W --keep-going -b doctest docs docs/_build/doctest

compile-check: $(STAMP)
	$(PY) -m pysparse_attn.backends.compile_check

bench-cpu: $(STAMP)
	$(PY) bench/cpu.py

bench-gpu:
	$(PYTHON) bench/gpu.py

clean:
	rm -rf build docs/_build docs/generated docs/auto_examples pysparse_attn/_cpu*.so pysparse_attn/_cpu*.cpp
