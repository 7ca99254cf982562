# flora_ext: set-up, build, demo and tests.
#
#   make demo    create .venv, build the extension in place, train the byte-level LM example
#   make test    create .venv (+ test requirements), build, cpp-test, wheel-test, run pytest
#   make cpp-test    CMake build of the C++ library, ctest, examples/cpp (CPU)
#   make wheel-test  build the wheel, install it into a fresh venv, smoke-test it
#   make clean   remove build products (keeps .venv); make distclean also removes .venv
#
# Build settings are taken from the environment when set: CUDA_HOME, TORCH_CUDA_ARCH_LIST,
# MAX_JOBS, FLORA_WITH_CUDA. Without nvcc the extension is built CPU-only (FLORA_WITH_CUDA=0).
# The build re-runs when csrc/, setup.py, version.txt or cmake/*.in change.

SHELL := /bin/bash
.DEFAULT_GOAL := build

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

# ---------------------------------------------------------------------------- virtualenv
# Stamp files carry a hash of what they install, so editing a pin re-runs pip.
BASE_PACKAGES := torch==2.14.1 pybind11 ninja pytest numpy
BASE_HASH     := $(shell echo '$(BASE_PACKAGES)' | sha256sum | cut -c1-12)
BASE_STAMP    := $(VENV)/.installed-$(BASE_HASH)

TEST_REQUIREMENTS := requirements-test.txt
TEST_HASH         := $(shell cat $(TEST_REQUIREMENTS) 2>/dev/null | sha256sum | cut -c1-12)
TEST_STAMP        := $(VENV)/.installed-test-$(TEST_HASH)

.PHONY: venv .venv
venv .venv: $(BASE_STAMP)

$(BASE_STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(BASE_PACKAGES)
	rm -f $(VENV)/.installed-[0-9a-f]*
	touch $@

$(TEST_STAMP): $(BASE_STAMP)
	if [ -f $(TEST_REQUIREMENTS) ]; then $(PIP) install -r $(TEST_REQUIREMENTS); \
	else echo "note: $(TEST_REQUIREMENTS) absent, no extra test packages installed"; fi
	rm -f $(VENV)/.installed-test-*
	touch $@

# -------------------------------------------------------------------------------- ccache
# torch.utils.cpp_extension (torch 2.14) prefixes both the C++ compiler ($CXX, default c++)
# and nvcc with `ccache` on its own whenever ccache is on PATH (_wrap_compiler; it can be
# turned off with TORCH_NO_COMPILER_WRAPPER=1). So we only make sure ccache is installed,
# and do not put it in CXX or PYTORCH_NVCC ourselves (that would wrap it twice or bypass
# the wrapper).
# `pip install -e .` compiles in a fresh temporary directory each time, and ninja runs
# there; with -g in the flags ccache would hash that directory and never hit, hence
# CCACHE_NOHASHDIR. CCACHE_BASEDIR must stay unset: it would rewrite our absolute
# include paths relative to that changing directory.
export CCACHE_NOHASHDIR ?= 1

.PHONY: ccache
ccache:
	@if command -v ccache >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing ccache (apt-get)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ccache; } \
	    || echo "warning: could not install ccache; building without a compiler cache" >&2; \
	else echo "warning: ccache not found (and not root); building without a compiler cache" >&2; fi

# --------------------------------------------------------------------------------- build
export CUDA_HOME ?= $(wildcard /usr/local/cuda)
export TORCH_CUDA_ARCH_LIST ?= 9.0a
export MAX_JOBS ?= 2
ifeq ($(strip $(CUDA_HOME)),)
export FLORA_WITH_CUDA ?= 0
else ifeq ($(wildcard $(CUDA_HOME)/bin/nvcc),)
export FLORA_WITH_CUDA ?= 0
endif

BUILD_INPUTS := $(shell find csrc -type f 2>/dev/null) setup.py \
                $(wildcard pyproject.toml version.txt cmake/*.in)
BUILD_STAMP  := $(VENV)/.flora-built

.PHONY: build
build: $(BUILD_STAMP)

$(BUILD_STAMP): $(BUILD_INPUTS) $(BASE_STAMP) | ccache
	@echo "building flora_ext: CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST) MAX_JOBS=$(MAX_JOBS) FLORA_WITH_CUDA=$(FLORA_WITH_CUDA)"
	@command -v ccache >/dev/null 2>&1 && ccache -z >/dev/null || true
	time $(PIP) install --no-build-isolation -v -e .
	@command -v ccache >/dev/null 2>&1 && { echo "ccache statistics for this build:"; ccache -s; } || true
	cd / && $(CURDIR)/$(PY) -c "import flora_ext, sys; print('flora_ext imports from', flora_ext.__file__)"
	touch $@

# ------------------------------------------------------------------------- demo and test
.PHONY: demo
demo: build
	$(PY) examples/python/train_charlm.py

.PHONY: test
test: build $(TEST_STAMP) cpp-test wheel-test
	@rc=0; FLORA_CPP_TESTS=$(CPP_BUILD_DIR)/tests/cpp/flora_cpp_tests FLORA_REQUIRE_CPP_TESTS=1 \
	  $(PY) -m pytest -q tests || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

# ------------------------------------------------------------------ C++ (CMake) and wheel
# cpp-test: libflora and its C++ tests built with CMake (CPU variant) against .venv's torch,
# ctest, then examples/cpp built against the CMake install (tools/cpp_test.sh); pytest's
# tests/test_cpp.py runs the same steps through its binary and through Python.
# wheel-test: `pip wheel`, installed into a fresh venv with the same torch, smoke-tested there
# with no compiler on PATH, examples/cpp built against it (tools/wheel_test.sh); it also checks
# that torch $(WHEEL_MISMATCH_TORCH) is refused at import, when pip has that torch locally.
CPP_BUILD_DIR        := build/cmake-cpu
WHEEL_MISMATCH_TORCH ?= 2.13.0

.PHONY: cpp-test wheel-test
cpp-test: $(BASE_STAMP) | ccache
	PYTHON=$(PY) FLORA_CMAKE_CUDA=OFF bash tools/cpp_test.sh $(CPP_BUILD_DIR)

wheel-test: $(BASE_STAMP) | ccache
	PYTHON=$(PY) MISMATCH_TORCH=$(WHEEL_MISMATCH_TORCH) bash tools/wheel_test.sh dist

# --------------------------------------------------------------------------------- clean
.PHONY: clean distclean
clean:
	rm -rf build dist *.egg-info .pytest_cache $(BUILD_STAMP)
	find flora_ext -maxdepth 2 \( -name '*.so' -o -name '*.pyd' \) -delete 2>/dev/null || true
	rm -rf flora_ext/_build_info.py flora_ext/include flora_ext/share
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || true

distclean: clean
	rm -rf $(VENV)
