"""Bisection over a monotone knob: the one search behind every "smallest amount that reaches a target".

Used by :func:`secateur.allocation.structured.uniform_bracket` (the common per-group fraction that removes
a fraction of MACs or parameters), :class:`secateur.allocation.targets.ResourceTarget` (the scoped sparsity
that removes a fraction of the model's MACs) and :meth:`secateur.allocation.targets.LatencyTarget.search`
(the knob whose measured latency meets a goal).
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["smallest_reaching"]


def smallest_reaching(
    reaches: Callable[[float], bool], hi: float = 1.0, steps: int = 40, lo: float = 0.0
) -> tuple[float, float]:
    """Bracket ``(lo, hi)`` of the smallest knob ``x`` in ``[lo, hi]`` at which ``reaches(x)`` holds.

    Bisection with ``steps`` halvings of ``[lo, hi]``: ``reaches`` must be monotone in ``x`` (False below
    some point, True from it on) and is assumed True at the given ``hi`` (never called there). On return
    ``hi - lo`` is the initial width divided by ``2 ** steps``; ``reaches(hi)`` held whenever ``hi`` moved
    and ``reaches(lo)`` failed whenever ``lo`` moved, so the point where ``reaches`` turns True lies in
    ``(lo, hi]``. ``reaches`` is called exactly ``steps`` times, at the midpoints, in order.

    Args:
        reaches: the monotone predicate, e.g. "the removal at this common fraction removes half the MACs".
        hi: the upper end (a knob assumed to reach), e.g. 1.0 for a fraction.
        steps: number of halvings (0: the bracket is returned as given).
        lo: the lower end.

    Returns:
        ``(lo, hi)`` after the halvings; callers wanting "the smallest knob that reaches" take ``hi``.
    """
    for _ in range(steps):
        mid = (lo + hi) / 2
        if reaches(mid):
            hi = mid
        else:
            lo = mid
    return lo, hi
