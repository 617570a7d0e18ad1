"""Dependency graph: which channels of which tensors must be pruned together.

Public API: :class:`DependencyGraph` (``DependencyGraph.build(model, example_inputs)``), :class:`Group`,
:class:`Member`, :class:`ExampleInputs` (several example inputs whose traces merge), :func:`register_rule`,
:func:`register_module_rule`, :func:`register_norm`, :class:`OpContext`, :class:`ShapeUse` (a shape op whose
sizes come from module attributes, tensor sizes or literals: :mod:`secateur.graph.symbolic`) and
:class:`ShapeConflictError`.
"""

from secateur._torch import ExampleInputs
from secateur.graph import rules_recurrent  # noqa: F401  (registers the recurrent-layer rules)
from secateur.graph.groups import DependencyGraph, Group, Member
from secateur.graph.norms import probe_norm, register_norm
from secateur.graph.rules import (
    broadcast_couple,
    elementwise_rule,
    identity_rule,
    known_ops,
    register_module_rule,
    register_rule,
)
from secateur.graph.symbolic import ShapeConflictError, ShapeUse
from secateur.graph.tracer import OpContext, SplitEvent

__all__ = [
    "DependencyGraph",
    "ExampleInputs",
    "Group",
    "Member",
    "OpContext",
    "ShapeConflictError",
    "ShapeUse",
    "SplitEvent",
    "broadcast_couple",
    "elementwise_rule",
    "identity_rule",
    "known_ops",
    "probe_norm",
    "register_module_rule",
    "register_norm",
    "register_rule",
]
