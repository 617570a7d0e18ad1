"""The vision model matrix (torchvision, timm): shared setup and the check every model goes through.

The checks are the main matrix's (tests/graph/test_matrix.py), imported, not copied: 30% of the prunable units
of every group removed by a random criterion, the forward works, the oracle holds (float64, compacted ==
masked), parameters and MACs drop. A model secateur cannot prune must refuse with a named error
(UnsupportedOpError or GraphError whose message names the op); anything else is a failure.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

_ROOT = Path(__file__).resolve().parents[1]
for _p in (_ROOT / "tests" / "graph", Path(__file__).resolve().parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Models above this many parameters are checked only with SECATEUR_VISION_ALL=1 (minutes each on 2 cores).
LARGE_PARAMS = 100_000_000
RUN_ALL = os.environ.get("SECATEUR_VISION_ALL", "") not in ("", "0")


def check(model: torch.nn.Module, x: torch.Tensor, skip_incompatible: bool = False) -> dict:
    """The main matrix's check (raises on a refusal or a failure); returns the plan."""
    from test_matrix import assert_prunable

    torch.manual_seed(0)
    return assert_prunable(model.eval(), x, skip_incompatible=skip_incompatible)[1]


def outcome(model: torch.nn.Module, x: torch.Tensor) -> tuple[str, str]:
    """("pass", ""), ("partial", why) or ("refused", "<ErrorType>: message"); any other exception
    propagates (a failure).

    "partial": removing some groups breaks the model's own code (IncompatibleGroupError, e.g. a head width
    derived from the input width); with ``skip_incompatible=True`` those groups are left whole and the
    rest passes every check.
    """
    from secateur.errors import GraphError, IncompatibleGroupError

    try:
        check(model, x)
    except IncompatibleGroupError as e:
        try:
            plan = check(model, x, skip_incompatible=True)
        except GraphError as e2:
            return "refused", f"{type(e2).__name__}: {e2}"
        n = len(plan.get("skipped", {}))
        return "partial", f"{n} group(s) left whole; first: {str(e).splitlines()[1].strip()}"
    except GraphError as e:
        return "refused", f"{type(e).__name__}: {e}"
    return "pass", ""


def run_expecting(model, x, refusal: tuple[type, str] | None, partial: str | None = None) -> None:
    """Check ``model``.

    ``refusal=(ErrorType, pattern)``: assert that error is raised, its message naming the op.
    ``partial=pattern``: assert IncompatibleGroupError naming the op (pattern) by default, then that with
    ``skip_incompatible=True`` the rest passes every check and the skipped groups are listed in the plan.
    """
    from secateur.errors import IncompatibleGroupError

    if partial is not None:
        with pytest.raises(IncompatibleGroupError, match=partial):
            check(model, x)
        plan = check(model, x, skip_incompatible=True)
        assert plan["skipped"], "expected groups left whole"
        return
    if refusal is None:
        check(model, x)
        return
    err, match = refusal
    with pytest.raises(err, match=match):
        check(model, x)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
