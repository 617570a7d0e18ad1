"""Pruning-at-initialisation criteria: SNIP, GraSP and SynFlow.

- **SNIP** (Lee et al. 2019, "SNIP: Single-shot Network Pruning based on Connection Sensitivity",
  eq. 6): connection sensitivity ``s_j = |g_j w_j| / Σ_k |g_k w_k|`` with ``g = ∂L/∂w`` on one
  mini-batch. The normalisation is one positive constant for the whole network, so it does not
  change the ranking; we return ``|g ⊙ w|``.
- **GraSP** (Wang et al. 2020, "Picking Winning Tickets Before Training by Preserving Gradient
  Flow", eq. 8): ``S(-θ) = -θ ⊙ Hg`` with ``g = ∂L/∂θ`` and ``H`` the Hessian of the loss, and
  the paper removes the weights with the *highest* ``S`` (their removal reduces gradient flow the
  least). secateur's convention is "higher = more important, lowest pruned", so
  :class:`GraSP` returns ``θ ⊙ Hg = -S``: pruning its lowest values prunes the paper's highest.
  ``Hg`` is a Hessian-vector product by double backprop: ``∂(g_detached · ∇L(θ))/∂θ``, the
  gradient ``g`` being computed first and detached, as in the paper's algorithm 1. The direction is
  checked in ``tests/test_at_init.py`` against finite differences of ``||∇L||²`` along each removal.
  On *trained* weights GraSP is expected to do worse than random: near a minimum any large removal
  raises ``||∇L||²`` (it moves the network away from the minimum), and GraSP removes first the weights
  whose removal raises it most, i.e. those that disturb the trained function most (measured in
  ``docs/tradeoff.md``, "GraSP on trained weights"). Use it at initialisation, as the paper does.
- **SynFlow** (Tanaka et al. 2020, "Pruning neural networks without any data by iteratively
  conserving synaptic flow", section 6): ``R = 1ᵀ (Π_l |θ^[l]|) 1``, evaluated as the sum of the
  network's output on an all-ones input with every parameter replaced by its absolute value;
  score ``|θ ⊙ ∂R/∂θ|``. Data-free, but it needs an input shape. The paper applies it
  iteratively with an exponential schedule over 100 rounds (algorithm 1); that loop is
  :func:`secateur.methods.at_init.prune_at_init`. BatchNorm runs in eval mode (the released code's
  default), on absolute running statistics, and the computation uses float64 to avoid overflow of
  the path products; every parameter and buffer (and so every sign) is restored afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from secateur.criteria.element.base import register_criterion
from secateur.criteria.element.saliency import DataCriterion, LossFn, grads, mean_gradients, session
from secateur.errors import ConfigError
from secateur.scope import Target


@register_criterion("snip")
class SNIP(DataCriterion):
    """Connection sensitivity ``|g ⊙ w|`` (Lee et al. 2019, eq. 6 without its ranking-neutral
    normalisation), with ``g`` the gradient of the mean loss over the batches used.

    Output: ``{target.name: tensor of the weight's shape}``, higher = more important.
    Constructor, data handling and errors: see :class:`secateur.criteria.element.saliency.DataCriterion`
    (missing data raises ConfigError saying SNIP needs data).
    """

    name = "snip"

    def scores(self, targets: Sequence[Target]) -> dict[str, torch.Tensor]:
        with self.session(targets) as weights:
            gs = mean_gradients(self, weights)
            out = {t.name: (w.detach() * g).abs() for t, w, g in zip(targets, weights, gs)}
        return out


@register_criterion("grasp")
class GraSP(DataCriterion):
    """``θ ⊙ Hg`` (the negation of GraSP's ``S(-θ) = -θ ⊙ Hg``, Wang et al. 2020, eq. 8).

    The lowest values returned here are the paper's highest scores, which the paper prunes. ``g``
    is the detached gradient of the mean loss over the batches, ``Hg`` the Hessian-vector product
    of the same mean loss, by double backprop.

    Args:
        temperature: the logits are divided by it in the default cross-entropy loss (the authors'
            released code uses 200 to soften the softmax; the paper's equations use 1, the
            default). Ignored when a ``loss_fn`` is given.
        others: see :class:`secateur.criteria.element.saliency.DataCriterion`.

    Raises:
        ConfigError: missing data or model; a non-positive temperature.
    """

    name = "grasp"

    def __init__(
        self,
        model: nn.Module | None = None,
        data: Any = None,
        loss_fn: LossFn | None = None,
        num_batches: int | None = 1,
        train_mode: bool = True,
        temperature: float = 1.0,
    ) -> None:
        if not temperature > 0:
            raise ConfigError(f"criterion 'grasp': temperature must be > 0, got {temperature!r}")
        if loss_fn is None and temperature != 1.0:

            def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
                if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                    raise ConfigError("criterion 'grasp': the default loss needs batches (x, y)")
                return nn.functional.cross_entropy(model(batch[0]) / temperature, batch[1])

        super().__init__(model, data, loss_fn, num_batches, train_mode)
        self.temperature = temperature

    def scores(self, targets: Sequence[Target]) -> dict[str, torch.Tensor]:
        with self.session(targets) as weights:
            g = mean_gradients(self, weights)
            batches = self.batches()
            hg = [torch.zeros_like(w) for w in weights]
            for batch in batches:
                grad_f = grads(self.loss(batch), weights, create_graph=True)
                z = sum((gf * gd).sum() for gf, gd in zip(grad_f, g))
                if not isinstance(z, torch.Tensor) or not z.requires_grad:
                    continue  # the loss does not depend on the weights: Hg = 0
                for acc, h in zip(hg, grads(z, weights)):
                    acc.add_(h.detach())
            out = {t.name: w.detach() * h / len(batches) for t, w, h in zip(targets, weights, hg)}
        return out


@register_criterion("synflow")
class SynFlow:
    """Synaptic saliency ``|θ ⊙ ∂R/∂θ|``, ``R = 1ᵀ(Π_l |θ^[l]|)1`` (Tanaka et al. 2020, eq. 1, sec. 6).

    One call is one scoring round; the iterative 100-round exponential schedule is
    :func:`secateur.methods.at_init.prune_at_init`.

    Args:
        model: the network.
        example_inputs: a tensor of shape (N, ...) or the shape ``(...)`` of one input; only the
            shape is used: the input is ``ones(1, ...)``.
        dtype: computation dtype (float64 by default: products over many layers overflow float32).

    Output: ``{target.name: tensor of the weight's shape}`` (float64), higher = more important.

    Raises:
        ConfigError: no model or no input shape (SynFlow needs no data, but it needs the shape).
    """

    name = "synflow"

    def __init__(
        self,
        model: nn.Module | None = None,
        example_inputs: torch.Tensor | Sequence[int] | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if model is None or example_inputs is None:
            raise ConfigError(
                "criterion 'synflow' needs the model and an input shape: it needs no data, but it "
                "runs the network on an all-ones input; build it with model=<the network> and "
                "example_inputs=<a tensor (N, ...) or the shape of one input>"
            )
        self.model = model
        if isinstance(example_inputs, torch.Tensor):
            self.input_shape = tuple(example_inputs.shape[1:])
        else:
            self.input_shape = tuple(int(s) for s in example_inputs)
        self.dtype = dtype

    def scores(self, targets: Sequence[Target]) -> dict[str, torch.Tensor]:
        model = self.model
        tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
        saved = [t.data for t in tensors]
        device = saved[0].device if saved else torch.device("cpu")
        try:
            with torch.no_grad():
                for t in tensors:
                    t.data = t.data.abs().to(self.dtype)
            with session(model, targets, False) as weights:
                x = torch.ones((1, *self.input_shape), dtype=self.dtype, device=device)
                out = model(x)
                r = out.sum() if isinstance(out, torch.Tensor) else sum(o.sum() for o in out)
                gs = grads(r, weights)
                scores = {t.name: (w.detach() * g).abs() for t, w, g in zip(targets, weights, gs)}
        finally:
            for t, s in zip(tensors, saved):
                t.data = s
        return scores
