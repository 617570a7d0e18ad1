"""The BatchNorm-scale group criterion of network slimming (Liu et al. 2017, sec. 3.1)."""


from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import nn

from secateur.criteria.group.base import (
    NORM_TYPES,
    GroupCriterion,
    GroupScores,
    effective_tensor,
    register_group_criterion,
    unit_mean,
)
from secateur.errors import ConfigError
from secateur.graph.groups import DependencyGraph, Group


# ----------------------------------------------------------------------------------------------------
# network slimming
# ----------------------------------------------------------------------------------------------------
@register_group_criterion("bn_scale")
class BNScaleCriterion(GroupCriterion):
    """Network slimming (Liu et al. 2017, sec. 3.1): ``|γ|`` per unit from the group's norm layers
    (BatchNorm, LayerNorm, GroupNorm ``weight`` along dim 0), averaged over them.

    Args:
        missing: ``"error"`` (default) raises ConfigError naming a scored group without a norm scale;
            ``"skip"`` leaves such groups unpruned.
    """

    name = "bn_scale"

    def __init__(self, missing: str = "error") -> None:
        if missing not in ("error", "skip"):
            raise ConfigError(f"bn_scale: missing must be 'error' or 'skip', got {missing!r}")
        self.missing = missing

    def group_scores(self, group: Group, model: nn.Module) -> np.ndarray | None:  # type: ignore[override]
        parts = []
        for m in group.members:
            if m.is_buffer or m.dim != 0 or not m.name.endswith(".weight"):
                continue
            mod = model.get_submodule(m.module) if m.module else model
            if isinstance(mod, NORM_TYPES):
                g = effective_tensor(model, m.name).detach().abs().double().reshape(-1).cpu().numpy()
                parts.append(unit_mean(g, m, group.n_units))
        if not parts:
            if self.missing == "skip":
                return None
            raise ConfigError(
                f"bn_scale: group {group.name} has no BatchNorm/LayerNorm scale γ among its members "
                f"{[f'{m.name}:{m.dim}' for m in group.members][:6]}; protect it or use missing='skip'"
            )
        return np.mean(parts, axis=0)

    def scores(self, model: nn.Module, graph: DependencyGraph, group_ids: Sequence[int]) -> GroupScores:
        out = {}
        for gi in group_ids:
            s = self.group_scores(graph.groups[gi], model)
            if s is not None:
                out[gi] = s
        return out
