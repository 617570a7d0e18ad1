"""Element-wise masks held as PyTorch parametrizations.

A masked parameter is exposed to the module as ``original * mask`` (``torch.nn.utils.parametrize``),
so the effective weight is exactly zero wherever ``mask`` is False, whatever the optimizer does to
``original`` (momentum, weight decay): the gradient reaching ``original`` is masked too, and the
forward recomputes the product every call. This is the reversible applier of the design: masks can
change at any step, and :func:`detach_masks` bakes them into plain weights with exact zeros.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from secateur.errors import ConfigError


class ElementMask(nn.Module):
    """Parametrization ``w -> w * mask`` with a boolean ``mask`` buffer of the parameter's shape.

    The mask is a buffer (saved in ``state_dict`` under ``<module>.parametrizations.<name>.0.mask``)
    so checkpoints carry it. Shape: same as the masked parameter.
    """

    #: Registered as a buffer in ``__init__``; declared here so that type checkers read it as a Tensor
    #: (``nn.Module.__getattr__``, which serves buffers, is typed ``Tensor | Module``).
    mask: torch.Tensor

    def __init__(self, shape: torch.Size, device: torch.device | None = None) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(shape, dtype=torch.bool, device=device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask

    def extra_repr(self) -> str:
        density = self.mask.float().mean().item() if self.mask.numel() else 1.0
        return f"shape={tuple(self.mask.shape)}, density={density:.4f}"


def _parametrizations(module: nn.Module) -> nn.ModuleDict | None:
    """``module.parametrizations`` (tensor name -> :class:`~torch.nn.utils.parametrize.ParametrizationList`)
    when ``module`` is parametrized, else None (the test :func:`torch.nn.utils.parametrize.is_parametrized`
    makes, written so that type checkers narrow the result)."""
    lists = getattr(module, "parametrizations", None)
    return lists if isinstance(lists, nn.ModuleDict) else None


def _parametrization_list(module: nn.Module, name: str) -> parametrize.ParametrizationList | None:
    """The chain of parametrizations on ``module.<name>`` (it holds the stored tensor as ``original``), or
    None when ``module.<name>`` is not parametrized."""
    lists = _parametrizations(module)
    chain = lists[name] if lists is not None and name in lists else None
    return chain if isinstance(chain, parametrize.ParametrizationList) else None


def element_mask(module: nn.Module, name: str) -> ElementMask | None:
    """The :class:`ElementMask` parametrization on ``module.<name>``, or None if it has none."""
    chain = _parametrization_list(module, name)
    if chain is None:
        return None
    for p in chain:
        if isinstance(p, ElementMask):
            return p
    return None


def has_mask(module: nn.Module, name: str = "weight") -> bool:
    """True when ``module.<name>`` carries an :class:`ElementMask`."""
    return element_mask(module, name) is not None


def attach_mask(module: nn.Module, name: str = "weight") -> ElementMask:
    """Attach an all-ones mask to ``module.<name>`` (idempotent) and return it.

    Raises:
        ConfigError: if the module has no floating-point parameter called ``name``.
    """
    existing = element_mask(module, name)
    if existing is not None:
        return existing
    param = getattr(module, name, None)
    if not isinstance(param, torch.Tensor):
        raise ConfigError(f"{type(module).__name__} has no parameter {name!r} to mask")
    if not param.is_floating_point():
        raise ConfigError(
            f"cannot mask {type(module).__name__}.{name}: dtype {param.dtype} is not floating point"
        )
    mask = ElementMask(param.shape, device=param.device)
    parametrize.register_parametrization(module, name, mask)
    return mask


def get_mask(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The boolean mask of ``module.<name>`` (shape of the parameter).

    Raises:
        ConfigError: if the parameter is not masked.
    """
    m = element_mask(module, name)
    if m is None:
        raise ConfigError(f"{type(module).__name__}.{name} has no mask attached")
    return m.mask


def original(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The unmasked stored parameter behind a masked ``module.<name>`` (the optimizer's tensor).

    Raises:
        ConfigError: ``module`` has no tensor ``name``, parametrized or not.
    """
    chain = _parametrization_list(module, name)
    if chain is not None:
        return chain.original
    tensor = getattr(module, name, None)
    if not isinstance(tensor, torch.Tensor):
        raise ConfigError(f"{type(module).__name__} has no parameter {name!r}")
    return tensor


@torch.no_grad()
def set_mask(module: nn.Module, mask: torch.Tensor, name: str = "weight") -> None:
    """Replace the mask of ``module.<name>`` and zero the stored weights it removes.

    The stored (original) values are zeroed too, so a later :func:`detach_masks` needs no extra
    work. The *effective* weight stays exactly zero whatever the optimizer does; the stored value of
    a pruned entry can drift from zero under SGD momentum accumulated before pruning (its gradient is
    zero, but the momentum buffer is not), which is harmless because the mask multiplies it.

    Args:
        mask: bool (or 0/1) tensor of the parameter's shape; True keeps an entry.

    Raises:
        ConfigError: if the shape does not match or the parameter is not masked.
    """
    m = element_mask(module, name)
    if m is None:
        m = attach_mask(module, name)
    if tuple(mask.shape) != tuple(m.mask.shape):
        raise ConfigError(
            f"mask for {type(module).__name__}.{name} has shape {tuple(mask.shape)}, "
            f"expected {tuple(m.mask.shape)}"
        )
    m.mask.copy_(mask.to(dtype=torch.bool, device=m.mask.device))
    orig = original(module, name)
    orig.mul_(m.mask)


def masked_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """Yield ``(module_path, module, param_name)`` for every masked parameter of ``model``."""
    for path, module in model.named_modules():
        lists = _parametrizations(module)
        if lists is None:
            continue
        for pname in list(lists.keys()):
            if element_mask(module, pname) is not None:
                yield path, module, pname


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own.

    ``parametrize`` generates one ``Parametrized<Class>`` per module, but ``copy.deepcopy`` shares
    it between the original and the copy; removing a parametrization deletes the property from
    that class and would break the other module. A private copy of the class makes removal local.
    """
    cls = type(module)
    module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))


@torch.no_grad()
def detach_masks(model: nn.Module) -> nn.Module:
    """Bake every element mask into its parameter and remove the parametrizations (in place).

    Afterwards the model has plain ``nn.Parameter`` weights holding exact zeros where masks were
    False, and its ``state_dict`` keys are the usual ones. Safe on a ``copy.deepcopy`` of a masked
    model: the original keeps its masks. Returns ``model``.
    """
    for _, module, pname in list(masked_parameters(model)):
        _own_class(module)
        parametrize.remove_parametrizations(module, pname, leave_parametrized=True)
    return model


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose masks can be changed or removed without touching the original."""
    import copy

    clone = copy.deepcopy(model)
    for _, module in clone.named_modules():
        if parametrize.is_parametrized(module):
            _own_class(module)
    return clone
