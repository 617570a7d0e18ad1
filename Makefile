# Two commands for a new user: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.secateur-installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
FORTUNES := /usr/share/games/fortunes/fortunes

CHROMIUM := /usr/bin/chromium
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS='--index-url https://download.pytorch.org/whl/cpu'
# where plain PyPI would give the (much larger) CUDA build.
TORCH_PIP_ARGS ?=
# pip's verbosity: -qq shows errors only. A pip configuration listing local index folders that hold few
# packages makes pip warn "Location ... is ignored" once per package (about 90 lines); `PIPFLAGS=-q` shows
# warnings again. (Not named PIP_...: pip reads PIP_<OPTION> variables itself.)
PIPFLAGS ?= -qq

.PHONY: setup data browser demo test lint docs check-wheel clean

setup: $(STAMP) data

# torch first, pinned to the CPU wheel; the project's own requirement is a range.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIPFLAGS) --upgrade pip
	$(PY) -m pip install $(PIPFLAGS) torch==2.13.0 $(TORCH_PIP_ARGS)
	$(PY) -m pip install $(PIPFLAGS) -e '.[dev]'
	@touch $(STAMP)

data:
	@if [ ! -f $(FMNIST) ] || [ ! -f $(FORTUNES) ]; then \
	  echo "Installing Debian packages dataset-fashion-mnist and fortunes (needs root and apt-get)"; \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist fortunes >/dev/null; \
	  elif command -v sudo >/dev/null; then \
	    sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist fortunes >/dev/null; \
	  else \
	    echo "error: cannot install dataset-fashion-mnist: need apt-get as root (or sudo)." >&2; \
	    echo "       Alternatively set SECATEUR_FASHION_MNIST to a folder with the IDX files." >&2; exit 1; \
	  fi; \
	fi

# Headless Chromium: the test that screenshots the HTML report needs it.
browser:
	@if [ ! -x $(CHROMIUM) ]; then \
	  echo "Installing Debian package chromium (for the HTML report screenshot test)"; \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "warning: chromium not installed; the screenshot test will be skipped" >&2; \
	  else \
	    echo "warning: cannot install chromium (need apt-get as root); the screenshot test will be skipped" >&2; \
	  fi; \
	fi

demo: setup
	$(VENV)/bin/secateur demo

test: setup browser
	$(PY) -m pytest -q

# ruff, the import-linter contracts of pyproject.toml (layers, no cycles, private modules), and mypy
# ([tool.mypy] settings) on the low-layer packages that are clean today, named here: masks and allocation
# (~26 s cold on 2 cores, ~1 s with .mypy_cache). graph and compact join this list once they are clean.
MYPY_PACKAGES := src/secateur/masks src/secateur/allocation
lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports
	$(PY) -m mypy $(MYPY_PACKAGES)

# The documentation site (mkdocs-material; API reference from the docstrings by mkdocstrings) into
# build/site, offline; --strict makes every warning an error. Open build/site/index.html.
# (NO_MKDOCS_2_WARNING: Material for MkDocs prints a banner about its successor on every build otherwise.)
DOCS_STAMP := $(VENV)/.secateur-docs-installed
$(DOCS_STAMP): pyproject.toml
	$(PY) -m pip install $(PIPFLAGS) -e '.[docs]'
	@touch $(DOCS_STAMP)
docs: $(STAMP) $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# Build the wheel, install it with only the core dependencies into a fresh venv (a temporary folder), run
# `secateur --help`, `secateur recipes` and the README's first snippet there.
check-wheel:
	PYTHON=$(PYTHON) TORCH_PIP_ARGS='$(TORCH_PIP_ARGS)' PIPFLAGS='$(PIPFLAGS)' scripts/check_wheel.sh

clean:
	rm -rf $(VENV) runs build/site

# The torchvision/timm model matrix in its own environment (.venv-vision); not part of `make test`.
-include mk/vision.mk
