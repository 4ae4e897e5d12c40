# make run  -- install into .venv (if needed) and run the brain demo `e3fast demo --quick` (~5 min)
# make test -- install into .venv (if needed) and run the test suite
#
# The install is redone only when setup.py or the C++ sources change (stamp file in .venv).
# TORCH_SPEC picks the torch build: the default pin is a CPU wheel here; e.g.
# `make test TORCH_SPEC="torch==2.13.0 --index-url <a CUDA wheel index>"` for a GPU build.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP_FLAGS ?= --quiet

VENV_PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.e3fast-installed
NATIVE_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h)

.PHONY: run test install bench clean

run: install
	$(VENV)/bin/e3fast demo --quick

test: install
	$(VENV_PYTHON) -m pytest tests -q

bench: install
	$(VENV)/bin/e3fast bench

install: $(INSTALLED)

$(VENV_PYTHON):
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): $(VENV_PYTHON) setup.py $(NATIVE_SOURCES)
	$(VENV_PYTHON) -m pip install $(PIP_FLAGS) "setuptools>=64" wheel ninja
	$(VENV_PYTHON) -m pip install $(PIP_FLAGS) $(TORCH_SPEC)
	$(VENV_PYTHON) -m pip install $(PIP_FLAGS) --no-build-isolation --use-pep517 -e ".[test,demo]"
	touch $@

clean:
	rm -rf build $(VENV) e3fast/_C*.so *.egg-info
