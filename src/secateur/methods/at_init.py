"""Pruning at initialisation: score once (SNIP, GraSP) or iteratively (SynFlow), before training.

- SNIP (Lee et al. 2019, sec. 4): one mini-batch, one shot, keep the top-κ connections.
- GraSP (Wang et al. 2020, algorithm 1): one shot on the ``-θ ⊙ Hg`` scores.
- SynFlow (Tanaka et al. 2020, algorithm 1): data-free, ``n`` rounds (100 by default) with an
  exponential schedule: after round ``r`` the density is ``(1 - s)^(r/n)``; scores are recomputed
  on the masked network every round. Iterating is what avoids layer collapse (sec. 5-6).

The result is a :class:`~secateur.pruners.element.Pruner` whose masks hold the pruned-at-init network, to
be trained as usual (the pruner's own schedule is a one-shot at step 0 that has already happened).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from secateur._validate import check_sparsity
from secateur.criteria import Criterion, get_criterion
from secateur.criteria.element.at_init import SynFlow
from secateur.criteria.element.saliency import DataCriterion, LossFn, is_single_batch
from secateur.errors import ConfigError
from secateur.pruners.element import Pruner
from secateur.scope import Scope

DATA_CRITERIA = ("snip", "grasp", "taylor")


def _first_input(data: Any) -> Any:
    batch = data if is_single_batch(data) else next(iter(data))
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def build_at_init_criterion(
    model: nn.Module,
    criterion: str | Criterion,
    data: Any = None,
    loss_fn: LossFn | None = None,
    example_inputs: Any = None,
    **kwargs: Any,
) -> Criterion:
    """Build a registered criterion with the model and the data or input shape it needs.

    Raises:
        ConfigError: a data-dependent criterion (snip, grasp, taylor) without ``data``; synflow
            with neither ``example_inputs`` nor ``data`` to take the input shape from.
    """
    if not isinstance(criterion, str):
        return criterion
    if criterion in DATA_CRITERIA:
        return get_criterion(criterion, model=model, data=data, loss_fn=loss_fn, **kwargs)
    if criterion == "synflow":
        if example_inputs is None and data is not None:
            example_inputs = _first_input(data)
        return get_criterion("synflow", model=model, example_inputs=example_inputs, **kwargs)
    return get_criterion(criterion, **kwargs)


def prune_at_init(
    model: nn.Module,
    criterion: str | Criterion,
    sparsity: float,
    data: Any = None,
    *,
    rounds: int | None = None,
    schedule: str = "exponential",
    allocation: str = "global",
    scope: Scope | None = None,
    loss_fn: LossFn | None = None,
    example_inputs: Any = None,
) -> Pruner:
    """Prune ``model`` before training to ``sparsity`` (fraction in [0, 1) of the scoped weights).

    Args:
        criterion: ``"snip"``, ``"grasp"``, ``"synflow"`` (or any registered name / instance).
        data: one batch ``(x, y)`` or an iterable of batches, for data-dependent criteria.
        rounds: scoring rounds; default 100 for SynFlow (Tanaka et al. 2020, sec. 7) and 1 for the
            others (SNIP and GraSP are single-shot in their papers).
        schedule: ``"exponential"`` (round ``r`` of ``n`` reaches density ``(1 - s)^(r/n)``) or
            ``"linear"`` (sparsity ``s · r/n``).
        allocation: a registered allocation name ("global" in all three papers).
        example_inputs: for SynFlow, a tensor (N, ...) giving the input shape (else taken from data).

    Returns:
        the :class:`Pruner` holding the masks (``pruner.history`` lists each round's sparsity).

    Raises:
        ConfigError: a bad sparsity, rounds or schedule; a data-dependent criterion without data
            (the message says it needs data); SynFlow without an input shape.
    """
    sp = check_sparsity(sparsity)
    if schedule not in ("exponential", "linear"):
        raise ConfigError(f"schedule must be 'exponential' or 'linear', got {schedule!r}")
    crit = build_at_init_criterion(model, criterion, data, loss_fn, example_inputs)
    if rounds is None:
        rounds = 100 if isinstance(crit, SynFlow) else 1
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be an int >= 1, got {rounds!r}")
    if isinstance(crit, DataCriterion) and crit.model is not model:
        raise ConfigError("the criterion was built for a different model than the one being pruned")
    pruner = Pruner(model, sp, criterion=crit, allocation=allocation, scope=scope)
    for r in range(1, rounds + 1):
        frac = r / rounds
        target = 1.0 - (1.0 - sp) ** frac if schedule == "exponential" else sp * frac
        pruner.prune_to(target)
        pruner.history.append({"step": 0, "round": r, "target": target, "sparsity": pruner.sparsity()})
    pruner.last_update = 0
    return pruner
