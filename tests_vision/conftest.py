"""The vision model matrix (torchvision, timm): shared setup and the check every model goes through.

The checks are the main matrix's (tests/graph/test_matrix.py), imported, not copied: 30% of the prunable units
of every group removed by a random criterion, the forward works, the oracle holds (float64, compacted ==
masked), parameters and MACs drop. A model secateur cannot prune must refuse with a named error
(UnsupportedOpError or GraphError whose message names the op); anything else is a failure.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

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


@contextlib.contextmanager
def graph_traced_in_train_mode(x_train: torch.Tensor) -> Iterator[None]:
    """Within the block, ``DependencyGraph.build`` traces the model in train mode on ``x_train`` (each
    module's mode restored after): what a user does for modules that run only in training, such as
    auxiliary heads (``graph = DependencyGraph.build(model.train(), x_train)``, then
    ``prune_channels(model.eval(), x, graph=graph)``: the remedy UntracedModuleError names). Compaction and
    the oracle still run in eval mode, on the input the caller gives them.
    """
    from secateur.graph import DependencyGraph

    build = DependencyGraph.__dict__["build"].__func__

    def build_in_train_mode(cls, model, example_inputs, *args, **kwargs):
        modes = {m: m.training for m in model.modules()}
        model.train()
        try:
            return build(cls, model, x_train, *args, **kwargs)
        finally:
            for m, t in modes.items():
                m.training = t

    with mock.patch.object(DependencyGraph, "build", classmethod(build_in_train_mode)):
        yield


def check(
    model: torch.nn.Module,
    x: torch.Tensor,
    skip_incompatible: bool = False,
    x_train: torch.Tensor | None = None,
) -> tuple[torch.nn.Module, dict]:
    """The main matrix's check (raises on a refusal or a failure); returns (pruned model, plan).

    ``x_train``: the graph is traced in train mode on it (:func:`graph_traced_in_train_mode`; for modules
    that run only in training), the rest runs in eval mode on ``x``. Then also: the trace leaves every
    tensor of ``model`` bit-identical (running statistics not updated), and the pruned model runs in train
    mode on ``x_train`` with the outputs (number and shapes) of the original: the training-only modules
    were sliced consistently (the oracle, in eval mode, does not run them).
    """
    from test_matrix import assert_prunable

    torch.manual_seed(0)
    if x_train is None:
        return assert_prunable(model.eval(), x, skip_incompatible=skip_incompatible)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with graph_traced_in_train_mode(x_train):
        pruned, plan = assert_prunable(model.eval(), x, skip_incompatible=skip_incompatible)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items()), "the train-mode trace changed the model"
    shapes = [tuple(t.shape) for t in _train_outputs(model, x_train)]
    assert [tuple(t.shape) for t in _train_outputs(pruned, x_train)] == shapes
    return pruned, plan


def _train_outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The floating output tensors of one train-mode forward of a copy of ``model`` (no gradients)."""
    m = copy.deepcopy(model).train()
    with torch.no_grad():
        return [t for t in _tensors(m(x)) if t.is_floating_point()]


def _tensors(obj) -> list[torch.Tensor]:
    """The tensors in a (nested) output: a tensor, a tuple/list/namedtuple or a dict."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []


def outcome(model: torch.nn.Module, x: torch.Tensor, x_train: torch.Tensor | None = None) -> tuple[str, str]:
    """("pass", ""), ("partial", why) or ("refused", "<ErrorType>: message"); any other exception
    propagates (a failure).

    "partial": removing some groups breaks the model's own code (IncompatibleGroupError, e.g. a head width
    derived from the input width); with ``skip_incompatible=True`` those groups are left whole and the
    rest passes every check. ``x_train``: as in :func:`check`.
    """
    from secateur.errors import GraphError, IncompatibleGroupError

    try:
        check(model, x, x_train=x_train)
    except IncompatibleGroupError as e:
        try:
            plan = check(model, x, skip_incompatible=True, x_train=x_train)[1]
        except GraphError as e2:
            return "refused", f"{type(e2).__name__}: {e2}"
        n = len(plan.get("skipped", {}))
        return "partial", f"{n} group(s) left whole; first: {str(e).splitlines()[1].strip()}"
    except GraphError as e:
        return "refused", f"{type(e).__name__}: {e}"
    return "pass", ""


def run_expecting(
    model, x, refusal: tuple[type, str] | None, partial: str | None = None, train: tuple | None = None
) -> None:
    """Check ``model``.

    ``refusal=(ErrorType, pattern)``: assert that error is raised, its message naming the op.
    ``partial=pattern``: assert IncompatibleGroupError naming the op (pattern) by default, then that with
    ``skip_incompatible=True`` the rest passes every check and the skipped groups are listed in the plan.
    ``train=(pattern, x_train)``: modules that run only in train mode (auxiliary heads): assert that the
    default (eval-mode) trace raises UntracedModuleError naming them (pattern), then every check with the
    graph traced in train mode on ``x_train`` (an input the train-mode forward accepts).
    """
    from secateur.errors import IncompatibleGroupError, UntracedModuleError

    x_train = None
    if train is not None:
        match, x_train = train
        with pytest.raises(UntracedModuleError, match=match):
            check(model, x)
    if partial is not None:
        with pytest.raises(IncompatibleGroupError, match=partial):
            check(model, x, x_train=x_train)
        plan = check(model, x, skip_incompatible=True, x_train=x_train)[1]
        assert plan["skipped"], "expected groups left whole"
        return
    if refusal is None:
        check(model, x, x_train=x_train)
        return
    err, match = refusal
    with pytest.raises(err, match=match):
        check(model, x, x_train=x_train)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
