"""The smallest timm model of every family (timm.models.<module>; fewest parameters, counted on the meta
device by scripts/vision_matrix_report.py) through the main matrix's checks: random init, batch 1, its
smallest valid input. Run in .venv-vision (`make test-vision`); see docs/vision_matrix.md for the counts.

REFUSALS: models secateur refuses, with the error and a pattern naming the op (asserted).
FAILURES: models that fail some other way (a wrong model or a crash): findings, marked strict xfail with
the error.
"""

from __future__ import annotations

import pytest
import torch

from conftest import LARGE_PARAMS, RUN_ALL, run_expecting
from secateur.errors import GraphError, UnsupportedOpError  # noqa: F401

timm = pytest.importorskip("timm")

# family -> its smallest model (timm 1.0.31)
FAMILIES: dict[str, str] = {}

# The smallest input side each model accepts; 64 otherwise.
SIZE: dict[str, int] = {}

REFUSALS: dict[str, tuple[type, str]] = {}

FAILURES: dict[str, str] = {}

# Too slow for the default run (minutes each on 2 cores): only with SECATEUR_VISION_ALL=1.
SLOW: set[str] = set()


def _params() -> list:
    out = []
    for fam, name in sorted(FAMILIES.items()):
        marks = []
        if name in FAILURES:
            marks.append(pytest.mark.xfail(strict=True, reason=FAILURES[name]))
        out.append(pytest.param(name, marks=marks, id=f"{fam}:{name}"))
    return out


@pytest.mark.parametrize("name", _params())
def test_timm_model(name):
    if name in SLOW and not RUN_ALL:
        pytest.skip("slow: set SECATEUR_VISION_ALL=1")
    if not RUN_ALL:
        with torch.device("meta"):
            n = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
        if n > LARGE_PARAMS:
            pytest.skip(f"{n / 1e6:.0f}M parameters: set SECATEUR_VISION_ALL=1")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    s = SIZE.get(name, 64)
    run_expecting(model, torch.randn(1, 3, s, s), REFUSALS.get(name))
