"""ADMM weight pruning (Zhang et al. 2018, "A Systematic DNN Weight Pruning Framework using
Alternating Direction Method of Multipliers", ECCV, sec. 3-4).

Pruning is posed as ``min_W L(W)`` subject to ``W_i ∈ S_i`` (a sparsity set per layer) and split
with an auxiliary copy ``Z_i``. ADMM alternates:

1. a few SGD steps on ``L(W) + Σ_i ρ_i/2 ||W_i - Z_i + U_i||_F^2`` (eq. 6, :meth:`ADMM.penalty`),
2. ``Z_i ← Π_{S_i}(W_i + U_i)``, the Euclidean projection onto ``S_i`` (eq. 8, :meth:`ADMM.step`),
3. ``U_i ← U_i + W_i - Z_i`` (the scaled dual update, eq. 9),

with ``ρ`` increased over time (sec. 4.2, "ρ is gradually increased"). Then the weights are hard
pruned to the support of the projection and retrained with the mask fixed (masked retraining,
:meth:`ADMM.finalize` returns the masks and attaches them as element masks).

Sparsity sets here: ``"unstructured"`` (keep the ``n - ⌊s·n⌋`` largest-magnitude entries of the
layer; the projection keeps the top-k of ``|W + U|``), ``"filter"`` (keep the ``C - ⌊s·C⌋`` output
filters with the largest L2 norm, Zhang et al. 2018 / Wen et al. 2016 structured sets) and
``"N:M"`` (e.g. ``"2:4"``: keep the ``N`` largest of every ``M`` consecutive inputs of each row).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from secateur._validate import check_sparsity
from secateur.errors import ConfigError
from secateur.masks.element import set_mask
from secateur.masks.patterns import layer_mask, nm_mask, parse_pattern
from secateur.scope import Scope

__all__ = ["ADMM", "project"]


def project(v: torch.Tensor, pattern: str, sparsity: float | None = None, layer: str = "") -> torch.Tensor:
    """Euclidean projection of ``v`` onto a sparsity set: ``v`` with the removed entries zeroed.

    Args:
        v: ``(out, ...)`` weight-shaped tensor (Linear ``(out, in)``, conv ``(out, in, kh, kw)``).
        pattern: ``"unstructured"`` (top-k magnitude over the whole tensor, ``k = n - ⌊s·n⌋``),
            ``"filter"`` (top ``C - ⌊s·C⌋`` rows by L2 norm) or ``"N:M"`` (top-N magnitudes in every
            M consecutive entries of each row; ``sparsity`` ignored).
        sparsity: fraction in [0, 1) of entries (unstructured) or filters (filter) removed.

    Returns a new tensor of ``v.shape``: the closest point of the set in Frobenius norm (Zhang et al.
    2018, eq. 8; keeping the largest-magnitude entries/rows is that projection).

    Raises:
        ConfigError: unknown pattern, missing or out-of-range sparsity, bad N:M for the shape.
    """
    return v * _keep_mask(v, pattern, sparsity, layer)


def _keep_mask(v: torch.Tensor, pattern: str, sparsity: float | None, layer: str) -> torch.Tensor:
    kind = _kind(pattern)
    if kind == "nm":
        n, m = parse_pattern(pattern).nm  # type: ignore[misc]
        return nm_mask(v.abs(), n, m, layer)
    if sparsity is None:
        raise ConfigError(f"{layer or 'layer'}: pattern {pattern!r} needs a sparsity")
    if kind == "unstructured":
        return layer_mask(v.abs(), sparsity, layer)
    sp = check_sparsity(sparsity, f"sparsity of {layer or 'layer'}")
    norms = v.detach().reshape(v.shape[0], -1).float().norm(dim=1)
    k = math.floor(sp * v.shape[0])
    keep_rows = torch.ones(v.shape[0], dtype=torch.bool, device=v.device)
    if k > 0:
        keep_rows[torch.sort(norms, stable=True).indices[:k]] = False
    return keep_rows.reshape(-1, *([1] * (v.dim() - 1))).expand_as(v).clone()


def _kind(pattern: str) -> str:
    if not isinstance(pattern, str):
        raise ConfigError(f"ADMM pattern must be a string, got {pattern!r}")
    p = pattern.strip().lower()
    if p in ("unstructured", "filter"):
        return p
    try:
        parsed = parse_pattern(p)
    except ConfigError:
        parsed = None
    if parsed is None or parsed.kind != "nm":
        raise ConfigError(
            f"ADMM pattern must be 'unstructured', 'filter' or 'N:M' (e.g. '2:4'), got {pattern!r}"
        )
    return "nm"


class ADMM:
    """ADMM auxiliary variables ``Z``, ``U`` for every weight in ``scope``; usable from any loop.

    Own loop::

        admm = ADMM(model, sparsity=0.8, rho=1e-3, pattern="unstructured")
        for i, (x, y) in enumerate(loader):
            loss = F.cross_entropy(model(x), y) + admm.penalty()
            loss.backward(); opt.step(); opt.zero_grad()
            if (i + 1) % k == 0: admm.step()           # Z-, U-updates and the ρ schedule
        masks = admm.finalize()                         # hard prune, masks attached; now retrain

    As a :class:`~secateur.train.Trainer` callback, ``extra_loss`` returns the same :meth:`penalty`, which
    the Trainer adds to its task loss before backward (so both paths compute identical gradients);
    ``update_every`` steps apart :meth:`step` runs, and at ``on_train_end`` :meth:`finalize` hard-prunes
    if ``finalize_at_end``. ADMM installs no hooks on the model.

    Args:
        model: the network; its weights are read, never copied.
        sparsity: fraction in [0, 1) removed per layer (unstructured: entries; filter: output filters);
            ignored for N:M, whose sparsity is ``1 - N/M``.
        rho: initial ``ρ`` (> 0). rho_growth: ``ρ ← min(ρ · rho_growth, rho_max)`` after every
            :meth:`step` (Zhang et al. 2018 sec. 4.2 increase ρ progressively; 1.0 keeps it fixed).
        pattern: ``"unstructured"``, ``"filter"`` or ``"N:M"``.
        scope: which weights (default: every conv and linear weight, :class:`~secateur.scope.Scope`).
        update_every: callback only: optimizer steps between Z/U updates.

    Attributes:
        Z: dict ``{target name: tensor of the weight's shape}``, the auxiliary (projected) variables.
        U: dict ``{target name: tensor of the weight's shape}``, the scaled dual variables.
        history: one dict per :meth:`step` with ``primal`` ``(Σ ||W - Z||_F^2)^½``, ``dual``
            ``ρ (Σ ||Z - Z_prev||_F^2)^½`` and ``rho``.

    Raises:
        ConfigError: bad sparsity, rho or pattern; an N:M pattern a layer's row length cannot hold
            (the message names the layer; nothing is modified).
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float | None = None,
        rho: float = 1e-3,
        pattern: str = "unstructured",
        scope: Scope | None = None,
        rho_growth: float = 1.0,
        rho_max: float = 1.0,
        update_every: int = 100,
        finalize_at_end: bool = False,
    ) -> None:
        kind = _kind(pattern)
        if kind != "nm":
            if sparsity is None:
                raise ConfigError(f"ADMM: pattern {pattern!r} needs a sparsity in [0, 1)")
            check_sparsity(sparsity, "ADMM sparsity")
        if not (isinstance(rho, (int, float)) and rho > 0):
            raise ConfigError(f"ADMM: rho must be > 0, got {rho!r}")
        if not rho_growth >= 1.0 or not rho_max >= rho:
            raise ConfigError(
                f"ADMM: need rho_growth >= 1 and rho_max >= rho, got {rho_growth!r}, {rho_max!r}"
            )
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ConfigError(f"ADMM: update_every must be an int >= 1, got {update_every!r}")
        self.model = model
        self.pattern = pattern
        self.sparsity = sparsity
        self.rho = float(rho)
        self.rho_growth = float(rho_growth)
        self.rho_max = float(rho_max)
        self.update_every = update_every
        self.finalize_at_end = finalize_at_end
        self.targets = (scope or Scope()).resolve(model)
        # Validate every layer before keeping any state, so a bad layer leaves nothing half-built.
        with torch.no_grad():
            for t in self.targets:
                _keep_mask(self._w(t), pattern, sparsity, t.name)
        self.Z: dict[str, torch.Tensor] = {}
        self.U: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for t in self.targets:
                w = self._w(t)
                self.U[t.name] = torch.zeros_like(w)
                self.Z[t.name] = project(w, pattern, sparsity, t.name)
        self.history: list[dict[str, float]] = []

    @staticmethod
    def _w(t: Any) -> torch.Tensor:
        return getattr(t.module, t.param_name)

    def penalty(self) -> torch.Tensor:
        """``Σ_i ρ/2 ||W_i - Z_i + U_i||_F^2`` (eq. 6), a scalar with a graph to the weights."""
        total = None
        for t in self.targets:
            d = self._w(t) - self.Z[t.name] + self.U[t.name]
            term = 0.5 * self.rho * d.pow(2).sum()
            total = term if total is None else total + term
        assert total is not None
        return total

    @torch.no_grad()
    def step(self) -> dict[str, float]:
        """One Z-update (projection of ``W + U``) and U-update, then grow ρ; returns the residuals."""
        primal = dual = 0.0
        for t in self.targets:
            w = self._w(t).detach()
            z_prev = self.Z[t.name]
            z = project(w + self.U[t.name], self.pattern, self.sparsity, t.name)
            self.U[t.name] += w - z
            self.Z[t.name] = z
            primal += float((w - z).pow(2).sum())
            dual += float((z - z_prev).pow(2).sum())
        rec = {"primal": math.sqrt(primal), "dual": self.rho * math.sqrt(dual), "rho": self.rho}
        self.history.append(rec)
        self.rho = min(self.rho * self.rho_growth, self.rho_max)
        return rec

    def primal_residual(self) -> float:
        """``(Σ_i ||W_i - Z_i||_F^2)^½`` now."""
        with torch.no_grad():
            return math.sqrt(sum(float((self._w(t) - self.Z[t.name]).pow(2).sum()) for t in self.targets))

    @torch.no_grad()
    def finalize(self) -> dict[str, torch.Tensor]:
        """Hard-prune: mask = support of ``Π_S(W)``; attach it as an element mask on each weight.

        Returns ``{target name: bool keep-mask}`` (each of its weight's shape). Retrain afterwards with the
        masks in place (masked retraining, Zhang et al. 2018 sec. 4.3).
        """
        masks = {}
        for t in self.targets:
            keep = _keep_mask(self._w(t).detach(), self.pattern, self.sparsity, t.name)
            set_mask(t.module, keep, t.param_name)
            masks[t.name] = keep
        return masks

    # -- Trainer integration ----------------------------------------------------------------
    def extra_loss(self, trainer: Any) -> torch.Tensor:
        """Trainer hook: :meth:`penalty` (eq. 6), added to the task loss before backward."""
        return self.penalty()

    def on_step_end(self, trainer: Any) -> None:
        """Trainer hook: :meth:`step` every ``update_every`` optimizer steps."""
        if trainer.global_step % self.update_every == 0:
            self.step()

    def on_train_end(self, trainer: Any) -> None:
        """Trainer hook: :meth:`finalize` if ``finalize_at_end``."""
        if self.finalize_at_end:
            self.finalize()

    @property
    def names(self) -> Sequence[str]:
        """Qualified names of the constrained weights (the keys of ``Z`` and ``U``)."""
        return [t.name for t in self.targets]
