"""Plan comparison shared by the one-driver tests (tests/test_one_driver.py, tests/test_llm_one_driver.py).

An entry point's *outcome* is the plan it returns (:func:`secateur.compact.make_plan`'s JSON-able dict) or,
if it refuses, ``("ErrorType", message)``. Outcomes are compared in their JSON form (what ``plan.json``
holds: tuples become lists), so a plan returned in Python equals the same plan read back from a folder the
CLI wrote. Plans hold integers and names only (kept / removed indices, sizes), so equality is exact.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import secateur as sc
from secateur.errors import ConfigError
from secateur.pruners.channel import ChannelPruner


def outcome(fn: Callable[[], Any]) -> Any:
    """``fn()`` (a plan), or ``(error type name, message)`` if it raises ConfigError / CompactionError."""
    try:
        return fn()
    except (ConfigError, sc.CompactionError) as e:
        return (type(e).__name__, str(e))


def canonical(result: Any) -> Any:
    """``result`` as ``plan.json`` would hold it (JSON round trip: tuples -> lists, keys -> strings)."""
    return json.loads(json.dumps(result))


def removed_units(result: Any) -> int:
    """Units a plan removes over all its groups; 0 for a refusal."""
    return sum(len(g["removed"]) for g in result["groups"]) if isinstance(result, dict) else 0


def one_shot_plan(model: Any, example_inputs: Any, sparsity: float, **kw: Any) -> dict:
    """The plan of a one-shot :class:`ChannelPruner` at ``sparsity``: ``step(0)`` then ``finalize()``."""
    pruner = ChannelPruner(model, example_inputs, schedule=sparsity, **kw)
    pruner.step(0)
    pruner.finalize()
    assert pruner.plan is not None
    return pruner.plan


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    """Where two canonical outcomes first differ, as ``path: a != b`` (plan groups named by their group)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(a.keys() | b.keys()):
            if k not in a or k not in b:
                return f"{path}/{k}: only in {'the first' if k in a else 'the second'}"
            if a[k] != b[k]:
                return _first_difference(a[k], b[k], f"{path}/{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (u, v) in enumerate(zip(a, b)):
            if u != v:
                label = u.get("group", i) if isinstance(u, dict) else i
                return _first_difference(u, v, f"{path}[{label}]")
    return f"{path or '/'}: {str(a)[:300]} != {str(b)[:300]}"


def assert_same_plans(**outcomes: Any) -> Any:
    """Assert every named outcome equals the first (canonical form); return the first, canonical.

    The failure message names the entry point that differs and the first differing entry of its plan.
    """
    (first_name, first), *rest = ((k, canonical(v)) for k, v in outcomes.items())
    for name, other in rest:
        assert other == first, f"{name} != {first_name}: {_first_difference(other, first)}"
    return first
