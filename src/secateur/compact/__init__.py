"""Structured masks, physical compaction and the equivalence oracle.

Flow: choose units per group -> :func:`make_plan` (plain JSON data: kept indices per tensor and dim, module
attribute and config changes) -> :func:`mask_model` (zeroes what will go: the masked model computes what the
compacted one will) or :func:`compact` (slices every tensor, updates module attributes and the Hugging Face
config, in a transaction) -> :func:`check_equivalence` (the float64 oracle; :func:`verified_compact` runs it
inside the transaction).

Modules, one concept each:

- :mod:`~secateur.compact.plan`: the plan (:func:`make_plan`, :func:`check_plan`, the head and config keys).
- :mod:`~secateur.compact.transaction`: :class:`Journal`, :func:`restoring`, :func:`interrupts_deferred`:
  any exception or ``BaseException`` restores the state bit-identical (used by other packages too).
- :mod:`~secateur.compact.apply`: :func:`mask_model` and :func:`compact` (slicing, attributes, config).
- :mod:`~secateur.compact.verify`: the oracle (:func:`check_equivalence`, :func:`max_abs_diff`,
  :func:`require_finite_inputs`, :func:`verified_compact`, :func:`incompatible_groups`).
- :mod:`~secateur.compact.norms`: mask-aware norms (statistics over the kept channels).
"""

from __future__ import annotations

from .apply import compact, mask_model
from .plan import (
    CONFIG_FF_KEYS,
    CONFIG_HEAD_KEYS,
    CONFIG_HIDDEN_KEYS,
    CONFIG_KV_KEYS,
    HEAD_ATTRS,
    KV_HEAD_ATTRS,
    PLAN_VERSION,
    WIDTH_ATTRS,
    check_plan,
    hf_configs,
    make_plan,
)
from .transaction import Journal, interrupts_deferred, restoring
from .verify import (
    ATOL,
    RTOL,
    NonFiniteOutputError,
    OutputDiff,
    check_equivalence,
    forward_failure,
    incompatible_groups,
    max_abs_diff,
    output_diffs,
    require_finite_inputs,
    verified_compact,
)

__all__ = [
    "ATOL",
    "CONFIG_FF_KEYS",
    "CONFIG_HEAD_KEYS",
    "CONFIG_HIDDEN_KEYS",
    "CONFIG_KV_KEYS",
    "HEAD_ATTRS",
    "KV_HEAD_ATTRS",
    "PLAN_VERSION",
    "RTOL",
    "WIDTH_ATTRS",
    "Journal",
    "NonFiniteOutputError",
    "OutputDiff",
    "check_equivalence",
    "check_plan",
    "compact",
    "forward_failure",
    "hf_configs",
    "incompatible_groups",
    "interrupts_deferred",
    "make_plan",
    "mask_model",
    "max_abs_diff",
    "output_diffs",
    "require_finite_inputs",
    "restoring",
    "verified_compact",
]
