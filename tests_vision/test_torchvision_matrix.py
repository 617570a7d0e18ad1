"""Every torchvision classification model (random init, batch 1, its smallest valid input) through the main
matrix's checks. Run in .venv-vision (`make test-vision`); see docs/vision_matrix.md for the counts.

REFUSALS: models secateur refuses, with the error and a pattern naming the op (asserted).
PARTIAL: models where some groups break the model's own code: named by default, left whole on request.
TRAIN: models with modules that run only in train mode (auxiliary heads): named by default
(UntracedModuleError), pruned with the graph traced in train mode.
FAILURES: models that fail some other way (a wrong model or a crash): findings, marked strict xfail with
the error.
Models over conftest.LARGE_PARAMS run only with SECATEUR_VISION_ALL=1.
"""

from __future__ import annotations

import pytest
import torch

from conftest import LARGE_PARAMS, RUN_ALL, run_expecting

torchvision = pytest.importorskip("torchvision")

# The smallest input side each model accepts (from SIZES in scripts/vision_matrix_report.py); 64 otherwise.
SIZE: dict[str, int] = {
    "inception_v3": 96, "vit_b_16": 224, "vit_b_32": 224, "vit_l_16": 224, "vit_l_32": 224, "vit_h_14": 224,
    "maxvit_t": 224,
}

REFUSALS: dict[str, tuple[type, str]] = {}

# Removing some groups breaks the model's own code: the default raises IncompatibleGroupError naming the op
# and module (asserted); skip_incompatible=True leaves those groups whole and prunes the rest exactly. None
# since issue 17: Swin v1's C // num_heads and MaxViT's reshape to the input width are traced (the heads go
# with the input width, which is frozen unless prune_normalized=True; graph/symbolic.py).
PARTIAL: dict[str, str] = {}

# Auxiliary classifiers that run only in train mode (`if self.training`): the default eval-mode trace never
# reaches them, so UntracedModuleError names them (asserted: pattern). The graph traced in train mode on
# (2, 3, side, side) couples them to the trunk; pruned and checked in eval mode, and the pruned model's
# train-mode outputs keep their shapes (aux heads sliced consistently). Inception v3's aux head needs the
# full 299 input in train mode (its 5x5 pooling and 5x5 conv); batch 2 for BatchNorm's batch statistics.
TRAIN: dict[str, tuple[str, int]] = {
    "googlenet": (r"8 module\(s\).*'aux1\.conv\.conv' \(Conv2d\).*'aux2\.fc2' \(Linear\)", 64),
    "inception_v3": (r"5 module\(s\).*'AuxLogits\.conv0\.conv' \(Conv2d\).*'AuxLogits\.fc' \(Linear\)", 299),
}

FAILURES: dict[str, str] = {}

# 82 s on one core, 644M parameters (too many to build just to count them): only with SECATEUR_VISION_ALL=1.
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
    model = None
    if not RUN_ALL:
        try:
            with torch.device("meta"):
                n = sum(p.numel() for p in build(weights=None).parameters())
        except NotImplementedError:  # RegNet computes its widths with tensor ops: count on a real build
            torch.manual_seed(0)
            model = build(weights=None)
            n = sum(p.numel() for p in model.parameters())
        if n > LARGE_PARAMS:
            pytest.skip(f"{n / 1e6:.0f}M parameters: set SECATEUR_VISION_ALL=1")
    if model is None:
        torch.manual_seed(0)
        model = build(weights=None)
    model.eval()
    s = SIZE.get(name, 64)
    x = torch.randn(1, 3, s, s)
    train = None
    if name in TRAIN:
        match, side = TRAIN[name]
        train = (match, torch.randn(2, 3, side, side))
    run_expecting(model, x, REFUSALS.get(name), PARTIAL.get(name), train)
