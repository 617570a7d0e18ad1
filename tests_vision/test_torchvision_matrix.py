"""Every torchvision classification model (random init, batch 1, its smallest valid input) through the main
matrix's checks. Run in .venv-vision (`make test-vision`); see docs/vision_matrix.md for the counts.

REFUSALS: models secateur refuses, with the error and a pattern naming the op (asserted).
FAILURES: models that fail some other way (a wrong model or a crash): findings, marked strict xfail with
the error.
Models over conftest.LARGE_PARAMS run only with SECATEUR_VISION_ALL=1.
"""

from __future__ import annotations

import pytest
import torch

from conftest import LARGE_PARAMS, RUN_ALL, run_expecting
from secateur.errors import GraphError, UnsupportedOpError  # noqa: F401

torchvision = pytest.importorskip("torchvision")

# The smallest input side each model accepts (from SIZES in scripts/vision_matrix_report.py); 64 otherwise.
SIZE: dict[str, int] = {}

REFUSALS: dict[str, tuple[type, str]] = {}

FAILURES: dict[str, str] = {}


def _names() -> list:
    out = []
    for name in torchvision.models.list_models(module=torchvision.models):
        marks = []
        if name in FAILURES:
            marks.append(pytest.mark.xfail(strict=True, reason=FAILURES[name]))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.mark.parametrize("name", _names())
def test_torchvision_model(name):
    build = torchvision.models.get_builder(name)
    if not RUN_ALL:
        with torch.device("meta"):
            n = sum(p.numel() for p in build(weights=None).parameters())
        if n > LARGE_PARAMS:
            pytest.skip(f"{n / 1e6:.0f}M parameters: set SECATEUR_VISION_ALL=1")
    torch.manual_seed(0)
    model = build(weights=None).eval()
    s = SIZE.get(name, 64)
    run_expecting(model, torch.randn(1, 3, s, s), REFUSALS.get(name))
