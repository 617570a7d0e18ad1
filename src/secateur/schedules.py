"""Schedules: when masks change and to which sparsity.

A schedule is a pure function of the training step (the number of optimizer steps done), so it
is identical on every DDP rank and after a resume. ``update_at(step)`` returns the sparsity to
apply at that step, or ``None`` when the masks must not change; ``sparsity_at(step)`` is the
scheduled value at any step (for plots and reports).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from secateur._validate import check_sparsity
from secateur.errors import ConfigError


class Schedule(Protocol):
    """When and how much to prune; see the module docstring."""

    def update_at(self, step: int) -> float | None: ...

    def sparsity_at(self, step: int) -> float: ...

    @property
    def update_steps(self) -> list[int]: ...


def _check_int(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class OneShot:
    """Prune once, to ``sparsity``, at step ``at`` (0 means before training starts)."""

    sparsity: float
    at: int = 0

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        _check_int(self.at, "at", 0)

    def update_at(self, step: int) -> float | None:
        return self.sparsity if step == self.at else None

    def sparsity_at(self, step: int) -> float:
        return self.sparsity if step >= self.at else 0.0

    @property
    def update_steps(self) -> list[int]:
        return [self.at]


@dataclass(frozen=True)
class Iterative:
    """Prune in ``steps`` equal stages, at ``start + j * every`` for j = 0..steps-1.

    ``mode="linear"`` reaches ``sparsity * (j+1)/steps`` at stage j; ``mode="geometric"`` removes
    the same fraction of the remaining weights each stage, density ``(1-sparsity)^((j+1)/steps)``
    (the iterative pruning of Han et al. 2015 and of lottery-ticket IMP, Frankle & Carbin 2019).
    """

    sparsity: float
    steps: int
    every: int = 1
    start: int = 0
    mode: str = "linear"

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        _check_int(self.steps, "steps", 1)
        _check_int(self.every, "every", 1)
        _check_int(self.start, "start", 0)
        if self.mode not in ("linear", "geometric"):
            raise ConfigError(f"mode must be 'linear' or 'geometric', got {self.mode!r}")

    def _stage(self, j: int) -> float:
        frac = (j + 1) / self.steps
        if self.mode == "linear":
            return self.sparsity * frac
        return 1.0 - (1.0 - self.sparsity) ** frac

    def update_at(self, step: int) -> float | None:
        if step < self.start or (step - self.start) % self.every:
            return None
        j = (step - self.start) // self.every
        return self._stage(j) if j < self.steps else None

    def sparsity_at(self, step: int) -> float:
        if step < self.start:
            return 0.0
        j = min((step - self.start) // self.every, self.steps - 1)
        return self._stage(j)

    @property
    def update_steps(self) -> list[int]:
        return [self.start + j * self.every for j in range(self.steps)]


@dataclass(frozen=True)
class Cubic:
    """Gradual magnitude pruning schedule of Zhu & Gupta 2017 ("To prune, or not to prune", eq. 1).

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))**3`` for t in {t0, t0+dt, ..., t0+n*dt}:
    masks are updated every ``dt`` steps from ``t0``, ``n`` times after the first, ending at
    ``s_f``. Sparsities are fractions in [0, 1).
    """

    final_sparsity: float
    start: int
    every: int
    n: int
    initial_sparsity: float = 0.0

    def __post_init__(self) -> None:
        check_sparsity(self.final_sparsity, "final_sparsity")
        check_sparsity(self.initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > self.final_sparsity:
            raise ConfigError(
                f"initial_sparsity {self.initial_sparsity} exceeds final_sparsity {self.final_sparsity}"
            )
        _check_int(self.start, "start", 0)
        _check_int(self.every, "every", 1)
        _check_int(self.n, "n", 1)

    @property
    def end(self) -> int:
        """The last update step, ``t0 + n * dt``."""
        return self.start + self.n * self.every

    def sparsity_at(self, step: int) -> float:
        if step < self.start:
            return 0.0
        t = min(step, self.end)
        frac = 1.0 - (t - self.start) / (self.n * self.every)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * frac**3

    def update_at(self, step: int) -> float | None:
        if step < self.start or step > self.end or (step - self.start) % self.every:
            return None
        return self.sparsity_at(step)

    @property
    def update_steps(self) -> list[int]:
        return list(range(self.start, self.end + 1, self.every))
