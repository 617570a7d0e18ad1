"""RIA: Relative Importance and Activations (Zhang et al., ICLR 2024).

"Plug-and-Play: An Efficient Post-training Pruning Method for Large Language Models", section 3, eq. (1)
and (2). For a Linear layer with weight ``W`` of shape ``(out, in)`` (row ``i`` an output, column ``j`` an
input), the *relative importance* of ``W_ij`` is its magnitude relative to every weight that shares its
input channel and to every weight that shares its output channel:

    RI_ij = |W_ij| / sum_k |W_kj|  +  |W_ij| / sum_k |W_ik|,

and the score multiplies it by the input channel's activation norm raised to ``a`` (the paper's
``a = 0.5``):

    RIA_ij = RI_ij * (||X_j||_2)^a,

``X_j`` the ``j``-th input feature over all calibration tokens (Wanda's statistic; see
:class:`secateur.criteria.activations.InputStats`). The paper compares the scores over the whole layer
(its reference code prunes per output row only on request, as "Wanda's tactic"); in secateur the
comparison is the ``pattern`` (``"layer"`` for the paper's choice, ``"row"``, ``"N:M"``). The
channel permutation of the paper's N:M section (3.3) is not implemented: N:M groups are the stored
consecutive inputs.

Registered as the element criterion ``"ria"`` (``Pruner(model, ..., criterion="ria", data=...)``,
recipes); the one-shot drivers of :mod:`secateur.llm` (``method="ria"``) call :func:`ria_scores` with the
statistics they accumulate block by block.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from secateur.criteria.activations import InputStats
from secateur.criteria.element.base import register_criterion
from secateur.criteria.element.saliency import is_single_batch
from secateur.errors import ConfigError
from secateur.masks.element import original
from secateur.masks.patterns import Pattern, pattern_mask
from secateur.scope import Target

#: The paper's exponent of the activation norm (section 3, "a = 0.5").
RIA_EXPONENT = 0.5

__all__ = ["RIA", "RIA_EXPONENT", "relative_importance", "ria_mask", "ria_scores"]


def relative_importance(weight: torch.Tensor, layer: str = "") -> torch.Tensor:
    """``RI_ij = |W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|`` (RIA, eq. 1), float64 ``(out, in)``.

    A column (or row) whose weights are all zero contributes 0 rather than 0/0.

    Raises:
        ConfigError: ``weight`` is not 2-D (naming ``layer``).
    """
    if weight.dim() != 2:
        raise ConfigError(f"{layer or 'layer'}: RIA needs a 2-D weight (out, in), got {tuple(weight.shape)}")
    w = weight.detach().abs().double()
    col = w.sum(0, keepdim=True)  # sum over outputs: weights sharing input j
    row = w.sum(1, keepdim=True)  # sum over inputs: weights sharing output i
    return _safe_div(w, col) + _safe_div(w, row)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(num.dtype).tiny), torch.zeros_like(num))


def ria_scores(
    weight: torch.Tensor, column_norms: torch.Tensor, a: float = RIA_EXPONENT, layer: str = ""
) -> torch.Tensor:
    """RIA scores ``RI_ij * ||X_j||_2^a`` (Zhang et al. 2024, eq. 2), float64 ``(out, in)``; higher = keep.

    Args:
        weight: ``(out, in)``.
        column_norms: ``(in,)``, the input features' L2 norms over the calibration tokens.
        a: the exponent of the activation norm (0.5 in the paper; 0 gives the relative importance alone).
        layer: a name for error messages.

    Raises:
        ConfigError: a weight that is not 2-D, norms of another length, a negative norm or a negative or
            non-finite ``a`` (naming ``layer``).
    """
    ri = relative_importance(weight, layer)
    if column_norms.shape != (weight.shape[1],):
        raise ConfigError(
            f"{layer or 'layer'}: weight {tuple(weight.shape)} and column norms "
            f"{tuple(column_norms.shape)} do not fit (need (out, in) and (in,))"
        )
    if not (isinstance(a, (int, float)) and not isinstance(a, bool) and 0.0 <= float(a) < float("inf")):
        raise ConfigError(f"{layer or 'layer'}: RIA exponent a must be a finite number >= 0, got {a!r}")
    norms = column_norms.detach().to(ri.device, torch.float64)
    if bool((norms < 0).any()):
        raise ConfigError(f"{layer or 'layer'}: column norms must be >= 0")
    return ri * norms.pow(float(a)).unsqueeze(0)


def ria_mask(
    weight: torch.Tensor,
    column_norms: torch.Tensor,
    sparsity: float | None = None,
    pattern: str | tuple[int, int] | Pattern = "layer",
    a: float = RIA_EXPONENT,
    layer: str = "",
) -> torch.Tensor:
    """Bool keep-mask ``(out, in)`` of the highest RIA scores under ``pattern``.

    ``"layer"`` (the paper's comparison, the default here) prunes ``floor(sparsity * out * in)`` of the
    layer; ``"row"`` ``floor(sparsity * in)`` per output row; ``"2:4"`` / ``(N, M)`` keeps N of every M
    consecutive inputs of each row (sparsity implied). ``sparsity`` is a fraction in [0, 1).

    Raises:
        ConfigError: as :func:`ria_scores` and :func:`secateur.masks.patterns.pattern_mask`.
    """
    return pattern_mask(ria_scores(weight, column_norms, a, layer), pattern, sparsity, layer)


@register_criterion("ria")
class RIA:
    """Element criterion ``"ria"``: :func:`ria_scores` of each scoped Linear weight.

    The input norms ``||X_j||_2`` come from one pass over ``data`` in eval mode with forward hooks on the
    scored Linears (padding excluded through an ``attention_mask`` in mapping batches); the model's mode,
    weights and buffers are left as they were. Output: ``{target.name: float64 tensor (out, in)}``.

    Args:
        model: the network the targets belong to.
        data: one batch or an iterable of batches: a tensor (the input), a pair ``(input, target)``, or a
            mapping of keyword arguments for ``model(**batch)``.
        a: exponent of the activation norm (0.5, the paper's).
        num_batches: how many batches of an iterable to use (None: all).

    Raises:
        ConfigError: no model or no data, ``num_batches`` < 1, a scoped parameter that is not the weight
            of an ``nn.Linear`` (named), a Linear the data never reaches (named), or the errors of
            :func:`ria_scores`.
    """

    name = "ria"

    def __init__(
        self, model: nn.Module | None = None, data: Any = None, a: float = RIA_EXPONENT,
        num_batches: int | None = None,
    ) -> None:
        if model is None or data is None:
            raise ConfigError(
                "criterion 'ria' needs data: it scores weights by their inputs' norms, so build it with "
                "model=<the network> and data=<a batch or an iterable of batches>"
            )
        if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                        or num_batches < 1):
            raise ConfigError(
                f"criterion 'ria': num_batches must be an int >= 1 or None, got {num_batches!r}"
            )
        self.model, self.data, self.a, self.num_batches = model, data, a, num_batches

    def _batches(self) -> list[Any]:
        batches = [self.data] if is_single_batch(self.data) else list(self.data)
        if self.num_batches is not None:
            batches = batches[: self.num_batches]
        if not batches:
            raise ConfigError("criterion 'ria': the data yielded no batch")
        return batches

    @torch.no_grad()
    def column_norms(self, targets: Sequence[Target]) -> dict[str, torch.Tensor]:
        """``{target.name: ||X_j||_2 (in,)}`` of each scoped Linear over the data (float64).

        Raises:
            ConfigError: a target that is not a Linear's weight, or a Linear the data never reaches.
        """
        for t in targets:
            if not isinstance(t.module, nn.Linear) or t.param_name != "weight":
                raise ConfigError(
                    f"criterion 'ria' scores Linear weights from their inputs; {t.name} is "
                    f"{type(t.module).__name__}.{t.param_name}: restrict the scope's types to Linear"
                )
        stats = {t.name: InputStats(t.module.in_features, device=original(t.module, "weight").device)
                 for t in targets}
        current: dict[str, torch.Tensor | None] = {"mask": None}
        handles = [
            t.module.register_forward_hook(
                lambda _m, inp, _o, _s=stats[t.name]: _s.add(inp[0], current["mask"])
            )
            for t in targets
        ]
        was_training = self.model.training
        self.model.eval()
        try:
            for b in self._batches():
                current["mask"] = _token_mask(b)
                _forward(self.model, b)
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)
        missing = [n for n, s in stats.items() if s.n_tokens == 0]
        if missing:
            raise ConfigError(f"criterion 'ria': the data never reached {', '.join(missing[:3])}")
        return {n: s.sq_sum.sqrt() for n, s in stats.items()}

    def scores(self, targets: Sequence[Target]) -> dict[str, torch.Tensor]:
        norms = self.column_norms(targets)
        return {
            t.name: ria_scores(getattr(t.module, t.param_name), norms[t.name], self.a, t.name)
            for t in targets
        }


def _token_mask(batch: Any) -> torch.Tensor | None:
    m = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return None if m is None else m.bool()


def _forward(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        model(batch[0])
    elif isinstance(batch, torch.Tensor):
        model(batch)
    else:
        raise ConfigError(
            f"criterion 'ria': a batch is a {type(batch).__name__}; expected a tensor, an (input, target) "
            "pair or a mapping of keyword arguments"
        )
