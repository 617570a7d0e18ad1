# `make test-vision`: the torchvision / timm model matrix in its own environment (.venv-vision).
# Included from the Makefile. torch 2.14.1 and torchvision 0.29.1 come from local disk (see /work/shared/ENV.md);
# timm comes from PyPI. The default environment (.venv) never needs any of this.
PYTHON ?= python3.11
VISION_VENV := .venv-vision
VISION_PY := $(VISION_VENV)/bin/python
VISION_STAMP := $(VISION_VENV)/.secateur-vision-installed

.PHONY: test-vision vision-setup vision-report

vision-setup: $(VISION_STAMP)

$(VISION_STAMP): pyproject.toml mk/vision.mk
	@test -x $(VISION_PY) || $(PYTHON) -m venv $(VISION_VENV)
	$(VISION_PY) -m pip install --quiet --upgrade pip
	$(VISION_PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(VISION_PY) -m pip install --quiet timm
	$(VISION_PY) -m pip install --quiet pytest
	$(VISION_PY) -m pip install --quiet -e .
	@touch $(VISION_STAMP)

test-vision: $(VISION_STAMP)
	$(VISION_PY) -m pytest -q tests_vision

# Runs the matrix and rewrites benchmarks/results/vision_matrix.json (counts and every failure with its error).
vision-report: $(VISION_STAMP)
	$(VISION_PY) scripts/vision_matrix_report.py
