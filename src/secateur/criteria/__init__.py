"""Criteria: how important each prunable unit is. One file per family of scores."""

from secateur.criteria.base import Criterion, get_criterion, register_criterion
from secateur.criteria.magnitude import Magnitude, RandomScore

__all__ = ["Criterion", "Magnitude", "RandomScore", "get_criterion", "register_criterion"]
