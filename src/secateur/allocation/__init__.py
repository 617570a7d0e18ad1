"""Allocation: how much to remove where.

- :mod:`~secateur.allocation.element`: element allocations over score tensors (layer-wise, global,
  capped global, ERK, LAMP), registered by name.
- :mod:`~secateur.allocation.sensitivity`: per-layer sparsities from a sensitivity sweep (Li et al. 2017).
- :mod:`~secateur.allocation.targets`: amounts stated as a fraction of the model's parameters, MACs or
  measured latency.
"""

from secateur.allocation.element import (
    ALLOCATIONS,
    Allocation,
    Masks,
    erk,
    erk_densities,
    get_allocation,
    global_,
    global_capped,
    lamp,
    layerwise,
    register_allocation,
    uniform,
)
from secateur.allocation.sensitivity import Sensitivity, sensitivity_sparsities, sensitivity_sweep
from secateur.allocation.targets import LatencyTarget, ResourceTarget

__all__ = [
    "ALLOCATIONS",
    "Allocation",
    "LatencyTarget",
    "Masks",
    "ResourceTarget",
    "Sensitivity",
    "erk",
    "erk_densities",
    "get_allocation",
    "global_",
    "global_capped",
    "lamp",
    "layerwise",
    "register_allocation",
    "sensitivity_sparsities",
    "sensitivity_sweep",
    "uniform",
]
