"""Counting parameters and multiply-accumulates (MACs).

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (which counts functional ops too):
MACs = FLOPs / 2 for the matmul/conv family it counts. On CPU, scaled-dot-product attention runs
as ``aten._scaled_dot_product_flash_attention_for_cpu``, which the counter does not know and would
count as free; we register its formula (QK^T and AV: 4·B·H·L·S·E FLOPs) so attention is never
reported as free.

*Sparse MACs* scale each leaf module's MACs by the density of its weights: exact for conv and
linear layers, where every weight is used the same number of times per output position.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class LayerStats:
    """Counts for one leaf module. ``macs`` are dense MACs for one forward of the example inputs."""

    name: str
    type: str
    params: int
    nonzero_params: int
    macs: int
    sparse_macs: int

    @property
    def sparsity(self) -> float:
        """Fraction of this module's parameters that are zero."""
        return 1.0 - self.nonzero_params / self.params if self.params else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sparsity": self.sparsity}


def _effective_params(module: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    """Direct parameters of ``module`` as forward sees them (masked weights through parametrizations).

    Values are ``(identity, tensor)``: the identity is that of the stored Parameter, so tied
    parameters (one Parameter used by two modules) are counted once.
    """
    out: dict[str, tuple[int, torch.Tensor]] = {}
    for name, p in module.named_parameters(recurse=False):
        out[name] = (id(p), p)
    parametrized = getattr(module, "parametrizations", None)
    if parametrized is not None:
        for name in parametrized.keys():
            out[name] = (id(parametrized[name].original), getattr(module, name))
    return out


def _type_name(module: nn.Module) -> str:
    """The user's class name, not parametrize's generated ``Parametrized<Class>`` subclass."""
    cls = type(module)
    if hasattr(module, "parametrizations") and cls.__name__.startswith("Parametrized"):
        cls = cls.__bases__[0]
    return cls.__name__


def _leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    leaves = []
    for name, m in model.named_modules():
        if name.endswith("parametrizations") or ".parametrizations." in name:
            continue
        if _effective_params(m):
            leaves.append((name, m))
    return leaves


@torch.no_grad()
def count_params(model: nn.Module) -> dict[str, int]:
    """Total and non-zero parameter counts (masked weights counted as they act: zeros are zeros).

    Shared (tied) parameters are counted once. Returns ``{"params": int, "nonzero_params": int}``.
    """
    seen: set[int] = set()
    total = nonzero = 0
    for _, m in _leaf_modules(model):
        for key, p in _effective_params(m).values():
            if key in seen:
                continue
            seen.add(key)
            total += p.numel()
            nonzero += int(torch.count_nonzero(p))
    return {"params": total, "nonzero_params": nonzero}


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    b, h, lq, e = query_shape
    s = key_shape[-2]
    ev = value_shape[-1]
    return 2 * b * h * lq * s * e + 2 * b * h * lq * s * ev


def _custom_flop_mapping() -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _sdpa_cpu_flops
    return mapping


def _call(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, tuple):
        return model(*example_inputs)
    return model(example_inputs)


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Turn ``requires_grad`` off on every parameter for the block, then restore it.

    Why: FlopCounterMode's module tracker (torch >= 2.14) registers gradient hooks on module inputs that
    require grad, and a view of a parameter taken under ``no_grad`` (e.g. ``cls_token.expand(...)`` in
    CaiT) still reports ``requires_grad`` without a grad function, which makes it raise.
    """
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in frozen:
            p.requires_grad_(True)


@torch.no_grad()
def layer_table(model: nn.Module, example_inputs: Any) -> list[LayerStats]:
    """Per leaf module (any module with direct parameters): params, non-zero params, MACs, sparse MACs.

    MACs are measured by running one forward pass on ``example_inputs`` (a tensor, a tuple of
    positional arguments or a dict of keyword arguments) under a FLOP counter, attributed to the
    innermost module with parameters that ran each op. The forward runs in eval mode, so BatchNorm
    statistics are untouched; every submodule's train/eval mode is restored afterwards.
    """
    leaves = _leaf_modules(model)
    macs: dict[str, int] = {name: 0 for name, _ in leaves}
    counter = FlopCounterMode(display=False, custom_mapping=_custom_flop_mapping())
    stack: list[tuple[str, int]] = []
    handles = []

    def pre(name: str):
        def hook(module: nn.Module, args: Any) -> None:
            stack.append((name, counter.get_total_flops()))

        return hook

    def post(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            _, start = stack.pop()
            flops = counter.get_total_flops() - start
            macs[name] += flops // 2
            # Do not count the same flops again in an enclosing leaf.
            stack[:] = [(n, s + flops) for n, s in stack]

        return hook

    # Count in eval mode: a training-mode forward would update BatchNorm running statistics, and
    # counting must never change the model. The previous mode of every submodule is restored.
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        for name, m in leaves:
            handles.append(m.register_forward_pre_hook(pre(name)))
            handles.append(m.register_forward_hook(post(name)))
        with frozen_parameters(model), counter:
            _call(model, example_inputs)
        total_macs = counter.get_total_flops() // 2
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    rows = []
    seen: set[int] = set()
    for name, m in leaves:
        params = nonzero = 0
        eff = _effective_params(m)
        for key, p in eff.values():
            if key in seen:
                continue
            seen.add(key)
            params += p.numel()
            nonzero += int(torch.count_nonzero(p))
        w = eff["weight"][1] if "weight" in eff else None
        density = float(torch.count_nonzero(w)) / w.numel() if w is not None and w.numel() else 1.0
        rows.append(LayerStats(name, _type_name(m), params, nonzero, macs[name], round(macs[name] * density)))
    unattributed = total_macs - sum(macs.values())
    if unattributed > 0:
        rows.append(LayerStats("(functional ops)", "-", 0, 0, unattributed, unattributed))
    return rows


def count_macs(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """Dense and sparse MACs of one forward pass on ``example_inputs``.

    Returns ``{"macs": int, "sparse_macs": int}`` (multiply-accumulates, not FLOPs; FLOPs ≈ 2·MACs).
    """
    rows = layer_table(model, example_inputs)
    return {"macs": sum(r.macs for r in rows), "sparse_macs": sum(r.sparse_macs for r in rows)}
