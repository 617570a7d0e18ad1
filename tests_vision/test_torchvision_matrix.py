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
from secateur.errors import UnsupportedOpError

torchvision = pytest.importorskip("torchvision")

# The smallest input side each model accepts (from SIZES in scripts/vision_matrix_report.py); 64 otherwise.
SIZE: dict[str, int] = {
    "inception_v3": 96, "vit_b_16": 224, "vit_b_32": 224, "vit_l_16": 224, "vit_l_32": 224, "vit_h_14": 224,
    "maxvit_t": 224,
}

_SWIN_V2_ZERO = (UnsupportedOpError, r"no coupling rule for op 'zero' in module 'features\.1\.0\.attn'")
REFUSALS: dict[str, tuple[type, str]] = {n: _SWIN_V2_ZERO for n in ("swin_v2_t", "swin_v2_s", "swin_v2_b")}

_SWIN_HEADS = (
    "wrong model: the compacted forward fails in shifted_window_attention (qkv.reshape(..., num_heads, "
    "C // num_heads) is invalid); torchvision derives head_dim from the input width C, secateur pruned qkv's "
    "per-head width independently of C"
)
FAILURES: dict[str, str] = {n: _SWIN_HEADS for n in ("swin_t", "swin_s", "swin_b")}
FAILURES["maxvit_t"] = (
    "wrong model: the compacted forward fails in maxvit's RelativePositionalMultiHeadAttention "
    "(maxvit.py:208, out.reshape(B, G, P, D) is invalid for the pruned width)"
)

# Over 2 minutes on 2 cores (its parameter count on the meta device fails): only with SECATEUR_VISION_ALL=1.
SLOW = {"regnet_y_128gf"}


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
    build = torchvision.models.get_model_builder(name)
    if name in SLOW and not RUN_ALL:
        pytest.skip("slow: set SECATEUR_VISION_ALL=1")
    if not RUN_ALL:
        with torch.device("meta"):
            n = sum(p.numel() for p in build(weights=None).parameters())
        if n > LARGE_PARAMS:
            pytest.skip(f"{n / 1e6:.0f}M parameters: set SECATEUR_VISION_ALL=1")
    torch.manual_seed(0)
    model = build(weights=None).eval()
    s = SIZE.get(name, 64)
    run_expecting(model, torch.randn(1, 3, s, s), REFUSALS.get(name))
