"""Masks: the reversible way a pruning decision takes effect during training."""

from secateur.masks.element import (
    ElementMask,
    attach_mask,
    copy_model,
    detach_masks,
    get_mask,
    has_mask,
    masked_parameters,
    set_mask,
)

__all__ = [
    "ElementMask",
    "attach_mask",
    "copy_model",
    "detach_masks",
    "get_mask",
    "has_mask",
    "masked_parameters",
    "set_mask",
]
