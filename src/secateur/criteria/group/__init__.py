"""Criteria over dependency-graph groups: one score per unit (channel, head, FFN neuron) of a group.

Where :mod:`secateur.criteria.group.functional` holds pure functions over unit matrices, this package reads
a group's members out of a live model (masked weights included) and, for the data-dependent criteria,
collects statistics during the user's training loop. Scores have shape ``(group.n_units,)``, float64,
higher = more important (the lowest go first). Registered names (:func:`available_group_criteria`):

- ``"random"``: uniform noise (a baseline, ShrinkBench's advice).
- ``"l1"`` / ``"l2"``: group magnitude (Li et al. 2017's filter norm over a whole group, as DepGraph, Fang et
  al. 2023): per unit ``Σ |w|^p`` over every weight removed with it (producing filters, norm scales γ and
  the consumers' input slices; biases and norm shifts β skipped), members summed as they are
  (:func:`secateur.criteria.group.norms.lp_scores`, read through masks; ``producers_only=True``: filters).
- ``"bn_scale"``: network slimming (Liu et al. 2017, sec. 3.1): ``|γ|`` of the group's BatchNorm /
  LayerNorm / GroupNorm members (mean over them when a residual group couples several).
- ``"fpgm"``: He et al. 2019 ("Filter Pruning via Geometric Median", sec. 3.3-3.4): the distance of each
  unit's filter to the geometric median of its producing layer's filters (``method="median"``) or eq.
  6's ``Σ_j ||F_i - F_j||`` (``method="sum"``); summed over producers after dividing each by its mean.
- ``"taylor"``: Molchanov et al. 2019 ("Importance Estimation for Neural Network Pruning", eq. 3-4):
  per mini-batch ``I_u = (Σ_{members} Σ_{s∈u} w_s g_s)^2``, averaged over the mini-batches seen between
  two pruning steps and smoothed across pruning steps by an EMA of momentum 0.9 (sec. 3.1-3.2).
- ``"fisher"``: Theis et al. 2018 (eq. 8-9) as used by Crowley et al. 2018: at the output ``a`` of each
  producing module (conv / linear), ``Δ_u = 1/(2N) Σ_n (Σ_{positions, s∈u} a_{ns} g_{ns})^2`` with
  ``g = ∂L/∂a``, recorded by forward/backward hooks; summed over the group's producers.

- ``"michel"``: Michel et al. 2019 ("Are Sixteen Heads Really Better than One?", eq. 2 and sec. 4.1):
  attention-head importance ``I_h = E_x |∂L(x)/∂ξ_h|`` for a gate ``ξ_h`` (= 1) multiplying head ``h``'s
  output, read at the layer that consumes the concatenated heads (the output projection) as
  ``∂L/∂ξ_h = Σ_{tokens} Σ_{d∈h} z_d ∂L/∂z_d`` (``z``: that layer's input), then divided by the layer's
  L2 norm of scores (sec. 4.1). See :class:`MichelCriterion`.

``"taylor"``, ``"fisher"`` and ``"michel"`` need gradients: call :meth:`GroupCriterion.accumulate` after each
``loss.backward()`` (Fisher records in its hooks on its own) or give the pruner ``data``; without either
they raise :class:`~secateur.errors.ConfigError` saying so. Their scores estimate the loss change of
removing a unit, so they are comparable across groups (``comparable = True``).
"""

import importlib as _importlib
import pkgutil as _pkgutil

from secateur.criteria.group import bn, gradient, heads, norms  # noqa: F401  (registration)
from secateur.criteria.group.base import (
    GROUP_CRITERIA,
    FunctionCriterion,
    GroupCriterion,
    GroupScores,
    available_group_criteria,
    collect,
    consumer_members,
    effective_tensor,
    get_group_criterion,
    head_group_ids,
    producer_members,
    register_group_criterion,
    stored_parameter,
)
from secateur.criteria.group.bn import BNScaleCriterion
from secateur.criteria.group.gradient import FisherCriterion, TaylorCriterion
from secateur.criteria.group.heads import MichelCriterion
from secateur.criteria.group.norms import FPGMCriterion, LpCriterion, RandomCriterion

__all__ = [
    "BNScaleCriterion",
    "FPGMCriterion",
    "FisherCriterion",
    "FunctionCriterion",
    "GROUP_CRITERIA",
    "GroupCriterion",
    "GroupScores",
    "LpCriterion",
    "MichelCriterion",
    "RandomCriterion",
    "TaylorCriterion",
    "available_group_criteria",
    "collect",
    "consumer_members",
    "effective_tensor",
    "get_group_criterion",
    "head_group_ids",
    "producer_members",
    "register_group_criterion",
    "stored_parameter",
]

# A criterion added as a new module of this package registers itself on import: adding one is one file.
for _mod in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f"{__name__}.{_mod.name}")
