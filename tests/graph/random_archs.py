"""Random architectures for property tests of the graph and compaction: DAGs of conv / BN / ReLU / add /
concat / split (chunk) / pooling / flatten / linear with consistent shapes and small channel counts.

One generator, two drivers: :func:`draw_spec` takes a ``draw(lo, hi) -> int`` callable (inclusive bounds), so
the hypothesis test draws from ``st.integers`` (shrinkable, seeded) and ``benchmarks/random_architectures.py``
from a seeded ``random.Random``. A spec is plain JSON data; :class:`RandomNet` interprets it.
:func:`check_spec` runs ``prune_channels(..., verify=True)`` and re-checks the result with an independent
float64 oracle, returning one of the outcomes in :data:`OUTCOMES`.

Imported as a plain module (tests/ has no packages): ``sys.path.insert(0, "tests/graph")``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Draw = Callable[[int, int], int]
Shape = tuple  # ("map", C, H, W) or ("vec", F)

MAP_OPS = ("conv",) * 4 + ("bn", "relu", "add", "mul", "cat", "chunk", "pool", "gap", "flatten")
VEC_OPS = ("linear", "linear", "relu", "add", "mul", "cat", "chunk")
#: Outcomes of :func:`check_spec`: the first two are the promise, the last two are bugs.
OUTCOMES = ("passed", "refused", "mismatch", "raw")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _partner(shapes: list[Shape], want: Callable[[Shape], bool], draw: Draw) -> int | None:
    """An earlier node whose shape satisfies ``want`` (any distance back: long skip connections), or None."""
    cand = [i for i, s in enumerate(shapes) if want(s)]
    return cand[draw(0, len(cand) - 1)] if cand else None


def _draw_op(kind: str, src: int, shapes: list[Shape], draw: Draw) -> tuple[dict, list[Shape]] | None:
    """One op of ``kind`` reading node ``src``: ``(op dict, output shapes)``, or None when it does not fit."""
    s = shapes[src]
    if kind == "conv":
        c, h, w = s[1:]
        out = draw(1, 8)
        common = [g for g in _divisors(c) if out % g == 0]
        groups = common[draw(0, len(common) - 1)]  # 1, grouped or depthwise (groups == c == out)
        k = (1, 3)[draw(0, 1)]
        stride = 2 if min(h, w) >= 4 and draw(0, 3) == 0 else 1
        op = {"op": "conv", "src": src, "out": out, "k": k, "groups": groups, "stride": stride}
        op["bias"] = bool(draw(0, 1))
        return op, [("map", out, (h - 1) // stride + 1, (w - 1) // stride + 1)]
    if kind == "bn":
        return {"op": "bn", "src": src}, [s]
    if kind == "relu":
        return {"op": "relu", "src": src}, [s]
    if kind in ("add", "mul"):
        other = _partner(shapes, lambda t: t == s, draw)
        return {"op": kind, "src": src, "other": other}, [s]
    if kind == "cat":
        if s[0] == "map":
            other = _partner(shapes, lambda t: t[0] == "map" and t[2:] == s[2:], draw)
            return {"op": "cat", "src": src, "other": other}, [("map", s[1] + shapes[other][1], *s[2:])]
        other = _partner(shapes, lambda t: t[0] == "vec", draw)
        return {"op": "cat", "src": src, "other": other}, [("vec", s[1] + shapes[other][1])]
    if kind == "chunk":  # x.chunk(2, dim=1): two nodes of ceil(C/2) and C - ceil(C/2) channels
        if s[1] < 2:
            return None
        a = math.ceil(s[1] / 2)
        return {"op": "chunk", "src": src}, [(s[0], a, *s[2:]), (s[0], s[1] - a, *s[2:])]
    if kind == "pool":
        if min(s[2:]) < 2:
            return None
        return {"op": "pool", "src": src, "max": bool(draw(0, 1))}, [("map", s[1], s[2] // 2, s[3] // 2)]
    if kind == "gap":
        return {"op": "gap", "src": src}, [("vec", s[1])]
    if kind == "flatten":
        return {"op": "flatten", "src": src}, [("vec", s[1] * s[2] * s[3])]
    if kind == "linear":
        op = {"op": "linear", "src": src, "out": draw(1, 12), "bias": bool(draw(0, 1))}
        return op, [("vec", op["out"])]
    raise ValueError(kind)


def draw_spec(draw: Draw, max_ops: int = 12) -> dict[str, Any]:
    """A random architecture as JSON data: ``{"input": [C, H, W], "ops": [...], "classes": k}``.

    The first op is a convolution of the input (a stem); each later op reads a recent node (``src``, one of
    the last three) and, for add/mul/cat, any earlier node of a compatible shape (``other``); a chunk adds two
    nodes. A head (global average pool or flatten when the
    last node is a feature map, then a linear layer to ``classes``) ends the net. ``draw(lo, hi)`` returns
    an int in ``[lo, hi]``.
    """
    c, h = draw(1, 4), draw(2, 8)
    shapes: list[Shape] = [("map", c, h, h)]
    ops: list[dict] = []
    for i in range(draw(1, max_ops)):
        src = draw(max(0, len(shapes) - 3), len(shapes) - 1)
        kinds = MAP_OPS if shapes[src][0] == "map" else VEC_OPS
        made = _draw_op("conv" if i == 0 else kinds[draw(0, len(kinds) - 1)], src, shapes, draw)
        if made is None:
            made = _draw_op("relu", src, shapes, draw)
        op, out = made
        ops.append(op)
        shapes.extend(out)
    last = len(shapes) - 1
    if shapes[last][0] == "map":
        kind = ("gap", "flatten")[draw(0, 1)]
        op, out = _draw_op(kind, last, shapes, draw)
        ops.append(op)
        shapes.extend(out)
    classes = draw(2, 5)
    ops.append({"op": "linear", "src": len(shapes) - 1, "out": classes, "bias": True})
    return {"input": [c, h, h], "ops": ops, "classes": classes}


def node_shapes(spec: dict[str, Any]) -> list[Shape]:
    """Shape of every node of ``spec`` (node 0 is the input)."""
    shapes: list[Shape] = [("map", *spec["input"])]
    for op in spec["ops"]:
        s = shapes[op["src"]]
        k = op["op"]
        if k == "conv":
            st = op["stride"]
            shapes.append(("map", op["out"], (s[2] - 1) // st + 1, (s[3] - 1) // st + 1))
        elif k in ("bn", "relu", "add", "mul"):
            shapes.append(s)
        elif k == "cat":
            shapes.append((s[0], s[1] + shapes[op["other"]][1], *s[2:]))
        elif k == "chunk":
            a = math.ceil(s[1] / 2)
            shapes += [(s[0], a, *s[2:]), (s[0], s[1] - a, *s[2:])]
        elif k == "pool":
            shapes.append(("map", s[1], s[2] // 2, s[3] // 2))
        elif k == "gap":
            shapes.append(("vec", s[1]))
        elif k == "flatten":
            shapes.append(("vec", s[1] * s[2] * s[3]))
        elif k == "linear":
            shapes.append(("vec", op["out"]))
    return shapes


class RandomNet(nn.Module):
    """The network a spec describes; layers are ``self.layers[f"op{i}"]`` for op ``i``."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.spec = spec
        shapes = node_shapes(spec)
        self.layers = nn.ModuleDict()
        for i, op in enumerate(spec["ops"]):
            c_in = shapes[op["src"]][1]
            if op["op"] == "conv":
                self.layers[f"op{i}"] = nn.Conv2d(
                    c_in, op["out"], op["k"], op["stride"], op["k"] // 2, groups=op["groups"], bias=op["bias"]
                )
            elif op["op"] == "bn":
                bn = nn.BatchNorm2d(c_in)
                with torch.no_grad():  # not the identity: running statistics and affine of a trained net
                    bn.running_mean.normal_(0.0, 0.5)
                    bn.running_var.uniform_(0.5, 2.0)
                    bn.weight.normal_(1.0, 0.5)
                    bn.bias.normal_(0.0, 0.5)
                self.layers[f"op{i}"] = bn
            elif op["op"] == "linear":
                self.layers[f"op{i}"] = nn.Linear(c_in, op["out"], bias=op["bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        for i, op in enumerate(self.spec["ops"]):
            a, k = nodes[op["src"]], op["op"]
            if k in ("conv", "bn", "linear"):
                nodes.append(self.layers[f"op{i}"](a))
            elif k == "relu":
                nodes.append(F.relu(a))
            elif k == "add":
                nodes.append(a + nodes[op["other"]])
            elif k == "mul":
                nodes.append(a * nodes[op["other"]])
            elif k == "cat":
                nodes.append(torch.cat([a, nodes[op["other"]]], dim=1))
            elif k == "chunk":
                nodes.extend(a.chunk(2, dim=1))
            elif k == "pool":
                nodes.append(F.max_pool2d(a, 2) if op["max"] else F.avg_pool2d(a, 2))
            elif k == "gap":
                nodes.append(F.adaptive_avg_pool2d(a, 1).flatten(1))
            elif k == "flatten":
                nodes.append(a.flatten(1))
        return nodes[-1]


def build(spec: dict[str, Any], seed: int = 0) -> tuple[RandomNet, torch.Tensor]:
    """``(model in eval mode, example input of batch 2)``, both from ``torch.manual_seed(seed)``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = RandomNet(spec).eval()
        x = torch.randn(2, *spec["input"])
    return model, x


def float64_close(a: Any, b: Any, rel: float = 1e-9) -> tuple[bool, float]:
    """Independent oracle: ``(close, max abs diff)`` of two float64 outputs, per tensor ``max|a - b| <= rel
    * max(max|a|, max|b|)`` (exact zeros must match exactly); NaN or Inf anywhere is never close."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape:
        return False, math.inf
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return False, math.nan
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    scale = max(float(a.abs().max()), float(b.abs().max())) if a.numel() else 0.0
    return diff <= rel * scale, diff


def check_spec(
    spec: dict[str, Any], ratio: float, criterion: str = "random", seed: int = 0
) -> tuple[str, str]:
    """Prune a spec's model with ``prune_channels(..., verify=True)`` and classify what happened.

    Returns ``(outcome, detail)``: ``("passed", number of units removed)`` when the compacted model equals
    the masked original in float64 (:func:`float64_close`, recomputed here, not trusting ``verify``);
    ``("refused", "error class: message")`` for a named refusal (GraphError or CompactionError subclass);
    ``("mismatch", why)`` when it returned a model that differs from the masked one or does not run;
    ``("raw", "error class: message")`` for any other exception.
    """
    from secateur.compact import mask_model
    from secateur.errors import CompactionError, GraphError
    from secateur.pruners.oneshot import prune_channels

    model, x = build(spec, seed)
    original = copy.deepcopy(model)
    try:
        pruned, plan = prune_channels(model, x, sparsity=ratio, criterion=criterion, seed=seed, verify=True)
    except (GraphError, CompactionError) as e:
        return "refused", f"{type(e).__name__}: {e}"[:300]
    except Exception as e:  # a raw exception is what this check looks for
        return "raw", f"{type(e).__name__}: {e}"[:300]
    try:
        with torch.no_grad():
            masked = mask_model(copy.deepcopy(original), plan).double()
            want = masked(x.double())
            got = copy.deepcopy(pruned).double()(x.double())
    except Exception as e:  # the returned model does not run: silent
        return "mismatch", f"pruned model fails: {type(e).__name__}: {e}"[:300]
    close, diff = float64_close(want, got)
    if not close:
        return "mismatch", f"max abs diff {diff:.3g}"
    return "passed", str(sum(len(g["removed"]) for g in plan["groups"]))
