"""Criteria: how important each prunable unit is. One file per family of scores.

Importing this package registers every criterion by name (see :func:`available_criteria`).
"""

from secateur.criteria import at_init, lamp, saliency, structured  # noqa: F401  (registration)
from secateur.criteria.base import Criterion, available_criteria, get_criterion, register_criterion
from secateur.criteria.magnitude import Magnitude, RandomScore

__all__ = [
    "Criterion",
    "Magnitude",
    "RandomScore",
    "available_criteria",
    "get_criterion",
    "register_criterion",
]
