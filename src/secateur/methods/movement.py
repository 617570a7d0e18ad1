"""Movement pruning (Sanh, Wolf & Rush 2020, "Movement Pruning: Adaptive Sparsity by
Fine-Tuning", NeurIPS, sec. 3-4).

Every pruned matrix ``W`` gets a learned score matrix ``S`` of its shape and the layer computes with
``W' = W ⊙ M(S)``. The mask is not differentiable, so the straight-through estimator passes the
gradient through it: ``∂L/∂S = ∂L/∂W' ⊙ W`` (sec. 3, eq. 2-3). Weights moving away from zero
accumulate large scores, whatever their magnitude.

- **Hard** movement: ``M = Top_v(S)``, the ``⌊r·n⌋`` largest scores of each matrix kept, where the
  remaining fraction ``r`` follows the cubic schedule of Zhu & Gupta 2017 (sec. 4, "cubic sparsity
  scheduling").
- **Soft** movement: ``M = 1(σ(S) > τ)`` with an L1 penalty ``λ Σ σ(S)`` added to the loss
  (sec. 3, "Soft movement pruning"); the density is then whatever the penalty drives it to.

Applied to ``nn.Linear`` (transformer projections) and ``nn.Conv*`` weights alike, through a
parametrization, so the layers themselves are unchanged. :meth:`Movement.finalize` turns the current
masks into ordinary element masks (:mod:`secateur.masks`) and removes the scores.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from secateur._validate import check_sparsity
from secateur.errors import ConfigError
from secateur.masks.element import set_mask
from secateur.schedules import Cubic
from secateur.scope import Scope

__all__ = ["Movement", "MovementMask", "topv_mask"]


def topv_mask(scores: torch.Tensor, remaining: float) -> torch.Tensor:
    """Bool mask of the ``⌊remaining · n⌋`` largest entries of ``scores`` (ties: earlier index first).

    Args:
        scores: any shape, ``n`` entries. remaining: fraction kept, in [0, 1].
    """
    flat = scores.detach().flatten()
    k = math.floor(remaining * flat.numel() + 1e-9)
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        keep[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    return keep.reshape(scores.shape)


class MovementMask(nn.Module):
    """Parametrization ``W -> W ⊙ M(S)`` with a learned score ``S`` (a Parameter of ``W``'s shape).

    Forward value ``W ⊙ M``; gradients: ``∂L/∂W = ∂L/∂W' ⊙ M`` and ``∂L/∂S = ∂L/∂W' ⊙ W`` (straight
    through ``M``, Sanh et al. 2020 eq. 3). ``mode``: ``"hard"`` (``M = Top_v(S)`` with
    ``v = ⌊remaining · n⌋``) or ``"soft"`` (``M = 1(σ(S) > tau)``).
    """

    def __init__(self, weight: torch.Tensor, mode: str, init_score: float, tau: float) -> None:
        super().__init__()
        self.mode = mode
        self.tau = tau
        self.remaining = 1.0
        self.scores = nn.Parameter(torch.full_like(weight.detach(), init_score))

    def mask(self) -> torch.Tensor:
        if self.mode == "hard":
            return topv_mask(self.scores, self.remaining)
        return torch.sigmoid(self.scores.detach()) > self.tau

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        m = self.mask().to(weight.dtype)
        # Value W*M; d/dS = g*W (straight-through), d/dW = g*M.
        return weight * (m + self.scores - self.scores.detach())


class Movement:
    """Attach movement scores to every weight in ``scope`` and schedule the hard threshold.

    Own loop::

        mv = Movement(model, sparsity=0.9, mode="hard", start=0, end=1000)
        opt = torch.optim.AdamW(model.parameters())       # after Movement: includes the scores
        for step, (x, y) in enumerate(loader):
            loss = F.cross_entropy(model(x), y) + mv.penalty()   # penalty is 0 for hard movement
            loss.backward(); opt.step(); opt.zero_grad()
            mv.update(step + 1)                                   # cubic schedule of r
        masks = mv.finalize()

    With the :class:`~secateur.train.Trainer`, create ``Movement`` before the Trainer (so its
    optimizer sees the scores) and pass it as a callback: ``extra_loss`` returns :meth:`penalty` (soft
    movement's ``λ Σ σ(S)``, a loss term in the paper; ``None`` for hard movement), which the Trainer
    adds to its task loss before backward, and ``on_step_end`` updates the schedule. No hooks are
    installed: the scores live in parametrizations that :meth:`finalize` removes.

    Args:
        model: changed in place (parametrizations on the selected weights).
        sparsity: final fraction in [0, 1) of each matrix removed (hard mode; the schedule ends there).
        mode: ``"hard"`` or ``"soft"``.
        start, end: optimizer steps where the cubic schedule starts and reaches ``sparsity``
            (Zhu & Gupta 2017; ``start == end`` jumps at once). Hard mode only.
        every: schedule update interval in steps.
        tau: soft threshold on ``σ(S)``, in (0, 1). lam: soft L1 coefficient λ >= 0.
        init_score: initial ``S`` (all equal: every weight kept at first; soft mode needs
            ``σ(init_score) > tau``).
        scope: which weights (default every conv and linear weight).

    Raises:
        ConfigError: bad mode, sparsity, schedule, tau or lam; a weight already parametrized by
            movement (the message names the layer; nothing is attached in that case).
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float = 0.9,
        mode: str = "hard",
        start: int = 0,
        end: int = 1000,
        every: int = 1,
        tau: float = 0.5,
        lam: float = 1e-4,
        init_score: float = 1.0,
        scope: Scope | None = None,
    ) -> None:
        if mode not in ("hard", "soft"):
            raise ConfigError(f"Movement: mode must be 'hard' or 'soft', got {mode!r}")
        check_sparsity(sparsity, "Movement sparsity")
        if not 0.0 < tau < 1.0:
            raise ConfigError(f"Movement: tau is a threshold on sigmoid scores, in (0, 1), got {tau!r}")
        if lam < 0:
            raise ConfigError(f"Movement: lam must be >= 0, got {lam!r}")
        for v, what in ((start, "start"), (end, "end"), (every, "every")):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"Movement: {what} must be an int >= 0, got {v!r}")
        if end < start or every < 1:
            raise ConfigError(f"Movement: need end >= start and every >= 1, got {start}, {end}, {every}")
        if mode == "soft" and not torch.sigmoid(torch.tensor(float(init_score))) > tau:
            raise ConfigError(
                f"Movement: sigmoid(init_score={init_score}) <= tau={tau} would prune everything"
            )
        self.model = model
        self.mode = mode
        self.sparsity = float(sparsity)
        self.lam = float(lam)
        self.every = every
        self.schedule = Cubic(
            final_sparsity=self.sparsity, start=start, every=every, n=max(1, (end - start) // every)
        )
        self._jump = end == start
        self.targets = (scope or Scope()).resolve(model)
        for t in self.targets:
            if parametrize.is_parametrized(t.module, t.param_name) and any(
                isinstance(p, MovementMask) for p in t.module.parametrizations[t.param_name]
            ):
                raise ConfigError(f"Movement: {t.name} already has movement scores")
        self.masks: dict[str, MovementMask] = {}
        for t in self.targets:
            mm = MovementMask(getattr(t.module, t.param_name), mode, float(init_score), float(tau))
            parametrize.register_parametrization(t.module, t.param_name, mm)
            self.masks[t.name] = mm
        self.update(0)

    def remaining_at(self, step: int) -> float:
        """Fraction ``r`` of each matrix kept at ``step`` (hard mode): ``1 - s_t`` of the cubic schedule."""
        t0 = self.schedule.start
        if self._jump:
            return 1.0 - (self.sparsity if step >= t0 else 0.0)
        if step > t0:  # masks change only every `every` steps
            step = t0 + (step - t0) // self.every * self.every
        return 1.0 - self.schedule.sparsity_at(step)

    def update(self, step: int) -> float:
        """Set the hard threshold for ``step``; returns the remaining fraction ``r``."""
        r = self.remaining_at(step) if self.mode == "hard" else 1.0
        for mm in self.masks.values():
            mm.remaining = r
        return r

    def scores(self) -> list[nn.Parameter]:
        """The score parameters ``S`` (one per pruned weight)."""
        return [mm.scores for mm in self.masks.values()]

    def penalty(self) -> torch.Tensor:
        """Soft movement's ``λ Σ σ(S)`` over every score (Sanh et al. 2020 sec. 3, a scalar with a graph
        to the scores; a constant 0 for hard movement or ``lam == 0``)."""
        if self.mode == "hard" or self.lam == 0.0:
            return torch.zeros(())
        return self.lam * sum(torch.sigmoid(s).sum() for s in self.scores())

    def density(self) -> float:
        """Fraction of weights currently kept over all pruned matrices."""
        with torch.no_grad():
            kept = sum(int(mm.mask().sum()) for mm in self.masks.values())
            total = sum(mm.scores.numel() for mm in self.masks.values())
        return kept / max(total, 1)

    @torch.no_grad()
    def finalize(self) -> dict[str, torch.Tensor]:
        """Replace the movement parametrizations by element masks holding the current ``M``.

        Weights are kept as stored (unmasked values are unchanged); returns ``{name: keep-mask}``.
        """
        out = {}
        for t in self.targets:
            mm = self.masks[t.name]
            keep = mm.mask().clone()
            plist = t.module.parametrizations[t.param_name]
            idx = [i for i, p in enumerate(plist) if p is mm]
            if len(plist) == 1:
                parametrize.remove_parametrizations(t.module, t.param_name, leave_parametrized=False)
            else:
                del plist[idx[0]]
            set_mask(t.module, keep, t.param_name)
            out[t.name] = keep
        self.masks = {}
        return out

    # -- Trainer integration -----------------------------------------------------------------
    def extra_loss(self, trainer: Any) -> torch.Tensor | None:
        """Trainer hook: :meth:`penalty` for soft movement (``None`` when it is identically 0)."""
        if self.mode == "hard" or self.lam == 0.0:
            return None
        return self.penalty()

    def on_train_begin(self, trainer: Any) -> None:
        """Trainer hook: set the hard threshold for the current step (resumed runs included)."""
        self.update(trainer.global_step)

    def on_step_end(self, trainer: Any) -> None:
        """Trainer hook: follow the cubic schedule (:meth:`update`)."""
        self.update(trainer.global_step)
