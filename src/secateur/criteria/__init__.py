"""Criteria: how important each prunable unit is. One file per family of scores.

- :mod:`secateur.criteria.element`: one score per weight, registered in ``CRITERIA``
  (:func:`available_criteria`).
- :mod:`secateur.criteria.group`: one score per unit of a dependency-graph group (channel, head, FFN
  neuron), registered in ``GROUP_CRITERIA`` (:func:`~secateur.criteria.group.available_group_criteria`).

Importing this package registers every element criterion by name.
"""

from secateur.criteria.element import at_init, lamp, saliency  # noqa: F401  (registration)
from secateur.criteria.element.base import Criterion, available_criteria, get_criterion, register_criterion
from secateur.criteria.element.magnitude import Magnitude, RandomScore

__all__ = [
    "Criterion",
    "Magnitude",
    "RandomScore",
    "available_criteria",
    "get_criterion",
    "register_criterion",
]
