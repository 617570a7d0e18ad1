"""Data-dependent saliency: the shared plumbing, and the element-wise first-order Taylor score.

Criteria that need gradients (SNIP, GraSP, Taylor) share one way of getting data and of leaving
the model exactly as they found it: they run forward/backward passes on batches given at
construction, take gradients with :func:`torch.autograd.grad` (so no ``.grad`` field is written
or consumed), and restore the model's train/eval mode, every parameter's ``requires_grad`` and
every buffer (BatchNorm running statistics move in train-mode forwards).

Gradients are taken with respect to the *stored* weight (``parametrizations.weight.original`` for
a masked weight). Because the stored value is zero wherever the mask is, ``w_orig * dL/dw_orig``
equals ``w_eff * dL/dw_eff`` for the effective (masked) weight, so scores are those of the network
as it computes.

The element-wise first-order Taylor score is Molchanov et al. 2019, "Importance Estimation for
Neural Network Pruning", eq. 3 for a single parameter: ``I_m = (g_m w_m)^2``, averaged over
mini-batches (section 3.1). The group version lives in :mod:`secateur.criteria.group.functional`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from secateur.criteria.element.base import register_criterion
from secateur.errors import ConfigError
from secateur.masks.element import original
from secateur.scope import Target

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def cross_entropy_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Default loss: ``F.cross_entropy(model(x), y)`` for a batch ``(x, y)`` (x: (N, ...), y: (N,)).

    Raises:
        ConfigError: the batch is not a pair ``(x, y)`` (then pass ``loss_fn(model, batch)``).
    """
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
        raise ConfigError(
            "the default loss needs batches (x, y) of inputs and class indices; got "
            f"{type(batch).__name__}. Pass loss_fn=lambda model, batch: <scalar loss> for other data"
        )
    return F.cross_entropy(model(batch[0]), batch[1])


def is_single_batch(data: Any) -> bool:
    """True when ``data`` is one batch (a tensor, a dict, or a tuple/list starting with a tensor),
    False when it is an iterable of batches (a DataLoader, a list of tuples, a generator)."""
    if isinstance(data, (torch.Tensor, Mapping)):
        return True
    return isinstance(data, (tuple, list)) and len(data) > 0 and isinstance(data[0], torch.Tensor)


def needs_data_error(name: str, what: str = "data") -> ConfigError:
    """The error every data-dependent criterion raises when built without data."""
    return ConfigError(
        f"criterion {name!r} needs {what}: it scores weights from gradients of a loss, so build it "
        f"with model=<the network> and data=<a batch (x, y) or an iterable of batches> "
        f"(and loss_fn=<callable(model, batch) -> scalar> for non-classification data)"
    )


class DataCriterion:
    """Base of criteria computed from gradients on data.

    Args:
        model: the network the scored targets belong to.
        data: one batch (e.g. ``(x, y)``) or an iterable of batches.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; default cross-entropy on ``(x, y)``.
        num_batches: how many batches of an iterable to use (default 1, as SNIP and GraSP use one
            mini-batch; ``None`` uses the whole iterable). Ignored for a single batch.
        train_mode: run the passes with the model in train mode (BatchNorm on batch statistics);
            the original mode is restored afterwards either way.

    Raises:
        ConfigError: ``model`` or ``data`` missing (the message says the criterion needs data),
            or ``num_batches`` < 1.
    """

    name = "data"

    def __init__(
        self,
        model: nn.Module | None = None,
        data: Any = None,
        loss_fn: LossFn | None = None,
        num_batches: int | None = 1,
        train_mode: bool = True,
    ) -> None:
        if model is None or data is None:
            raise needs_data_error(self.name)
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"criterion {self.name!r}: model must be an nn.Module, got {type(model).__name__}"
            )
        if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
            raise ConfigError(f"criterion {self.name!r}: num_batches must be an int >= 1 or None")
        self.model = model
        self.data = data
        self.loss_fn: LossFn = loss_fn or cross_entropy_loss
        self.num_batches = num_batches
        self.train_mode = train_mode

    def batches(self) -> list[Any]:
        """The batches used for one scoring (a fresh pass over ``data`` each call).

        Raises:
            ConfigError: the data yields no batch.
        """
        if is_single_batch(self.data):
            return [self.data]
        it: Iterator[Any] = iter(self.data)
        out = list(it if self.num_batches is None else itertools.islice(it, self.num_batches))
        if not out:
            raise ConfigError(f"criterion {self.name!r}: the data iterable yielded no batch")
        return out

    def loss(self, batch: Any) -> torch.Tensor:
        loss = self.loss_fn(self.model, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ConfigError(f"criterion {self.name!r}: loss_fn must return a scalar tensor, got {loss!r}")
        return loss.reshape(())

    @contextmanager
    def session(self, targets: Sequence[Target], train: bool | None = None) -> Iterator[list[torch.Tensor]]:
        """Yield the stored weights of ``targets`` (requiring grad); restore the model on exit."""
        yield from _session(self.model, targets, self.train_mode if train is None else train)

    def scores(self, targets: Sequence[Target]) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


def _session(model: nn.Module, targets: Sequence[Target], train: bool) -> Iterator[list[torch.Tensor]]:
    was_training = {m: m.training for m in model.modules()}
    params = list(model.parameters())
    requires = [p.requires_grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    weights = [original(t.module, t.param_name) for t in targets]
    grad_mode = torch.is_grad_enabled()
    try:
        # Pruner.prune_to runs criteria under no_grad; gradients are needed here.
        torch.set_grad_enabled(True)
        model.train(train)
        for w in weights:
            w.requires_grad_(True)
        yield weights
    finally:
        torch.set_grad_enabled(grad_mode)
        for w in weights:
            w.requires_grad_(False)
        for p, r in zip(params, requires):
            p.requires_grad_(r)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, t in was_training.items():
            m.training = t


session = contextmanager(_session)


def grads(
    loss: torch.Tensor, weights: Sequence[torch.Tensor], create_graph: bool = False
) -> list[torch.Tensor]:
    """``dL/dw`` for each weight (zeros for a weight the loss does not reach), without touching ``.grad``."""
    gs = torch.autograd.grad(loss, list(weights), create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for g, w in zip(gs, weights)]


def mean_gradients(crit: DataCriterion, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Gradient of the mean loss over ``crit.batches()``, detached (one backward per batch)."""
    batches = crit.batches()
    total = [torch.zeros_like(w) for w in weights]
    for batch in batches:
        for acc, g in zip(total, grads(crit.loss(batch), weights)):
            acc.add_(g.detach())
    return [t / len(batches) for t in total]


@register_criterion("taylor")
class TaylorFO(DataCriterion):
    """Element-wise first-order Taylor importance ``(g ⊙ w)^2``, averaged over mini-batches.

    Molchanov et al. 2019, eq. 3 (one parameter per group): the squared first-order change of the
    loss when a weight is removed. Output: ``{target.name: tensor of the weight's shape}``, higher
    is more important. See :class:`DataCriterion` for the constructor and errors.
    """

    name = "taylor"

    def scores(self, targets: Sequence[Target]) -> dict[str, torch.Tensor]:
        with self.session(targets) as weights:
            batches = self.batches()
            acc = [torch.zeros_like(w) for w in weights]
            for batch in batches:
                for a, w, g in zip(acc, weights, grads(self.loss(batch), weights)):
                    a.add_((w.detach() * g.detach()) ** 2)
        return {t.name: a / len(batches) for t, a in zip(targets, acc)}
