"""Expert removal in mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE and alike).

In transformers 5 a sparse-MoE block holds a **router** ``gate`` (a ``weight`` of shape
``(num_experts, hidden)``; logits ``x W^T``, softmax, top-k, optionally renormalised) and an **experts**
module whose weights are fused 3-D parameters, ``gate_up_proj (E, 2I, H)`` and ``down_proj (E, H, I)``,
indexed by expert along dim 0 (Qwen2-MoE adds an always-on shared expert, which is not touched).

Removing expert ``e`` means slicing row ``e`` of the router and index ``e`` of every per-expert tensor,
then updating ``num_experts`` on the modules and ``num_local_experts`` / ``num_experts`` in the config.
This is written as an ordinary secateur plan (:func:`expert_plan`, the format of
:func:`secateur.compact.make_plan`) and applied by the same transactional
:func:`secateur.compact.compact`, so :func:`secateur.save` / :func:`secateur.load` re-apply it and a failure
leaves the model as it was.

The oracle: the compacted model computes what the model with the removed experts' router logits set to
``-inf`` computes (:func:`mask_experts`): the softmax gives those experts probability exactly 0, top-k never
picks them (as long as ``top_k <= kept experts``), and the surviving probabilities are the softmax over the
kept experts, which is what the smaller router computes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from secateur._validate import check_sparsity
from secateur.compact import PLAN_VERSION, check_equivalence, compact, hf_configs, require_finite_inputs
from secateur.errors import ConfigError
from secateur.llm.oneshot import find_blocks
from secateur.llm.structural import Batch, calibration_batches

EXPERT_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts")
CONFIG_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
REDUCTIONS = ("sum", "mean")

__all__ = [
    "REDUCTIONS",
    "MoEBlock",
    "eager_experts",
    "expert_plan",
    "expert_saliency",
    "find_moe_blocks",
    "mask_experts",
    "remove_experts",
]


@dataclasses.dataclass
class MoEBlock:
    """One sparse-MoE block: module paths, the expert count ``num_experts`` and the router's ``top_k``."""

    path: str
    router_path: str
    experts_path: str
    num_experts: int
    top_k: int
    layer: int | None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _top_k(block: nn.Module, router: nn.Module, model: nn.Module) -> int:
    for obj in (router, block):
        k = getattr(obj, "top_k", None)
        if isinstance(k, int):
            return k
    k = getattr(getattr(model, "config", None), "num_experts_per_tok", None)
    return int(k) if isinstance(k, int) else 1


def find_moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """Every sparse-MoE block of ``model``: a module with a router ``gate`` (``weight`` of shape
    ``(E, hidden)``) and an ``experts`` module holding per-expert tensors ``(E, ...)`` and an int
    ``num_experts == E`` (the transformers 5 layout of Mixtral, Qwen2-MoE, Qwen3-MoE, ...).

    ``layer`` is the index of the decoder layer holding the block (None if the layers are not found).

    Raises:
        ConfigError: no such block; or experts kept as a ``ModuleList`` of separate MLPs (not supported:
            the block is named).
    """
    try:
        bpath, _ = find_blocks(model)
        pat: re.Pattern | None = re.compile(re.escape(bpath) + r"\.(\d+)(\.|$)")
    except ConfigError:
        pat = None
    out = []
    for path, mod in model.named_modules():
        experts, router = getattr(mod, "experts", None), getattr(mod, "gate", None)
        if not isinstance(experts, nn.Module) or not isinstance(router, nn.Module):
            continue
        w = getattr(router, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            continue
        if isinstance(experts, nn.ModuleList):
            raise ConfigError(
                f"{path}.experts is a ModuleList of separate expert MLPs; only fused per-expert tensors "
                "(transformers 5 layout) are supported"
            )
        e = getattr(experts, "num_experts", None)
        if not isinstance(e, int) or w.shape[0] != e:
            continue
        mt = pat.match(path) if pat is not None else None
        out.append(
            MoEBlock(
                path,
                _join(path, "gate"),
                _join(path, "experts"),
                e,
                _top_k(mod, router, model),
                int(mt.group(1)) if mt else None,
            )
        )
    if not out:
        raise ConfigError(
            f"{type(model).__name__} has no sparse-MoE block (a module with a router 'gate' whose weight is "
            "(num_experts, hidden) and an 'experts' module with num_experts)"
        )
    return out


# ----------------------------------------------------------------------------------------------------
# saliency
# ----------------------------------------------------------------------------------------------------
def _expert_call_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    vals = list(args[:3]) + [kwargs.get(n) for n in names[len(args[:3]) :]]
    if any(not isinstance(v, torch.Tensor) for v in vals):
        raise ConfigError(
            "the experts module was not called as experts(hidden_states, top_k_index, top_k_weights)"
        )
    return vals[0], vals[1], vals[2]


@torch.no_grad()
def expert_saliency(
    model: nn.Module,
    data: Any,
    reduction: str = "sum",
    blocks: Sequence[MoEBlock] | None = None,
) -> dict[str, torch.Tensor]:
    """Router-weighted activation saliency of every expert on calibration text, ``{block path: (E,)}``.

    For expert ``e`` of a block, with ``x_t`` the block's input at token ``t`` (padding excluded),
    ``f_e`` the expert's MLP and ``g_e(t)`` the weight the block multiplies ``f_e(x_t)`` by (the router's
    top-k probability after the model's own renormalisation; 0 when ``e`` is not among token ``t``'s
    top-k, ``T_e`` the tokens where it is):

    - ``reduction="sum"``: ``S_e = Σ_{t∈T_e} g_e(t) ||f_e(x_t)||_2`` (the total norm of the expert's
      contribution to the block output: frequency and strength together);
    - ``reduction="mean"``: ``S_e = (1/|T_e|) Σ_{t∈T_e} g_e(t) ||f_e(x_t)||_2``, REAP's criterion
      (Lasby et al. 2025, "REAP: Router-weighted Expert Activation Pruning", eq. for S_j); 0 when
      ``T_e`` is empty.

    ``f_e(x_t)`` is computed by the model's own experts module (called on the routed tokens with
    ``e`` as the only choice and weight 1), so any experts implementation is measured as it runs.
    Values are float64; higher = keep. The model is not changed (eval mode during the pass, mode
    restored).

    Raises:
        ConfigError: unknown reduction, no MoE block, bad calibration data.
    """
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    batches = calibration_batches(data)
    blocks = list(blocks) if blocks is not None else find_moe_blocks(model)
    sums = {b.path: torch.zeros(b.num_experts, dtype=torch.float64) for b in blocks}
    counts = {b.path: torch.zeros(b.num_experts, dtype=torch.float64) for b in blocks}
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def make_hook(b: MoEBlock):
        def hook(mod: nn.Module, args: tuple, kwargs: dict, _out: Any) -> None:
            h, idx, w = _expert_call_args(args, kwargs)
            m = current["mask"]
            if m is not None and m.numel() == h.shape[0]:
                keep = m.reshape(-1).to(h.device)
                h, idx, w = h[keep], idx[keep], w[keep]
            for e in range(b.num_experts):
                sel = idx == e  # (T, k): an expert appears at most once per token
                tok = sel.any(-1)
                n = int(tok.sum())
                if n == 0:
                    continue
                gate = (w * sel).sum(-1)[tok].double()
                y = mod.forward(  # bypasses hooks: f_e(x) alone
                    h[tok],
                    torch.full((n, 1), e, dtype=idx.dtype, device=idx.device),
                    torch.ones((n, 1), dtype=w.dtype, device=w.device),
                )
                sums[b.path][e] += float((gate * y.double().norm(dim=-1)).sum())
                counts[b.path][e] += n

        return hook

    handles = [
        model.get_submodule(b.experts_path).register_forward_hook(make_hook(b), with_kwargs=True)
        for b in blocks
    ]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            current["mask"] = batch["attention_mask"].bool()
            model(**batch, use_cache=False)
    finally:
        for hd in handles:
            hd.remove()
        model.train(was_training)
    if reduction == "sum":
        return sums
    return {p: sums[p] / counts[p].clamp_min(1) for p in sums}  # 0 where the expert was never chosen


# ----------------------------------------------------------------------------------------------------
# plan, masks
# ----------------------------------------------------------------------------------------------------
def _per_expert_tensors(mod: nn.Module, prefix: str, n: int) -> list[str]:
    names = [k for k, t in mod.named_parameters(recurse=True)]
    names += [k for k, t in mod.named_buffers(recurse=True)]
    tensors = dict(mod.named_parameters(recurse=True))
    tensors.update(dict(mod.named_buffers(recurse=True)))
    return [_join(prefix, k) for k in names if tensors[k].dim() >= 1 and tensors[k].shape[0] == n]


def _resolve(model: nn.Module, removed: Mapping[str, Iterable[int]]) -> list[tuple[MoEBlock, np.ndarray]]:
    blocks = {b.path: b for b in find_moe_blocks(model)}
    out = []
    for path, units in removed.items():
        if path not in blocks:
            raise ConfigError(
                f"{path!r} is not a sparse-MoE block of {type(model).__name__}; blocks: {sorted(blocks)}"
            )
        b = blocks[path]
        rm = np.unique(np.asarray(list(units), dtype=np.int64))
        if rm.size and ((rm < 0).any() or (rm >= b.num_experts).any()):
            raise ConfigError(f"{path}: expert index out of range 0..{b.num_experts - 1}: {rm.tolist()}")
        kept = b.num_experts - rm.size
        if kept < b.top_k:
            raise ConfigError(
                f"{path}: keeping {kept} of {b.num_experts} experts leaves fewer than top_k={b.top_k} "
                "(the router must choose top_k distinct experts)"
            )
        out.append((b, rm))
    return out


def expert_plan(model: nn.Module, removed: Mapping[str, Iterable[int]]) -> dict:
    """The secateur plan (format of :func:`secateur.compact.make_plan`) removing experts.

    Args:
        removed: ``{MoE block path: expert indices to remove}`` (paths from :func:`find_moe_blocks`).

    Returns a JSON-serialisable dict: ``"tensors"`` keeps the other experts along dim 0 of the router's
    per-expert tensors (``weight``, a bias) and of every per-expert tensor of the experts module;
    ``"attributes"`` sets ``num_experts`` (and alike) on the router, the experts and the block;
    ``"config"`` sets ``num_local_experts`` / ``num_experts`` when every MoE block ends with the same
    count (blocks left alone count with their old value), else records ``_inconsistent_<key>``;
    ``"groups"`` lists what was removed (``{"group": "<block>.experts", "n_units", "removed"}``).

    Raises:
        ConfigError: unknown block path, expert index out of range, fewer than ``top_k`` experts kept.
    """
    resolved = _resolve(model, removed)
    tensors: dict[str, dict[str, list[int]]] = {}
    attributes: dict[str, dict[str, list[int]]] = {}
    groups = []
    new_count = {b.path: b.num_experts for b in find_moe_blocks(model)}
    for b, rm in resolved:
        if rm.size == 0:
            continue
        keep = np.setdiff1d(np.arange(b.num_experts), rm).tolist()
        new_count[b.path] = len(keep)
        groups.append({"group": b.experts_path, "n_units": b.num_experts, "removed": rm.tolist()})
        for sub in (b.router_path, b.experts_path):
            for name in _per_expert_tensors(model.get_submodule(sub), sub, b.num_experts):
                tensors[name] = {"0": keep}
        for sub in (b.path, b.router_path, b.experts_path):
            mod = model.get_submodule(sub) if sub else model
            for a in EXPERT_COUNT_ATTRS:
                v = getattr(mod, a, None)
                if isinstance(v, int) and not isinstance(v, bool) and v == b.num_experts:
                    attributes.setdefault(sub, {})[a] = [v, len(keep)]
    config: dict[str, dict[str, list]] = {}
    if groups:
        olds = {b.num_experts for b in find_moe_blocks(model)}
        news = sorted(set(new_count.values()))
        for ck, cfg in hf_configs(model).items():
            aliases = getattr(type(cfg), "attribute_map", {}) or {}
            for k in CONFIG_EXPERT_KEYS:
                if k in aliases:  # e.g. Mixtral's num_experts -> num_local_experts: set the real key once
                    continue
                v = getattr(cfg, k, None)
                if isinstance(v, int) and not isinstance(v, bool) and v in olds:
                    if len(news) == 1:
                        config.setdefault(ck, {})[k] = [v, news[0]]
                    else:
                        config.setdefault(ck, {})["_inconsistent_" + k] = [v, news]
    return {
        "version": PLAN_VERSION,
        "tensors": tensors,
        "groups": groups,
        "attributes": attributes,
        "config": config,
    }


class _RouterLogitMask(TorchFunctionMode):
    """Sets the removed experts' logits to -inf where the router computes ``F.linear(x, weight)``."""

    def __init__(self, weight: torch.Tensor, keep: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.keep, self.hits = weight, keep, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        if func is F.linear and w is self.weight:
            self.hits += 1
            out = out.masked_fill(~self.keep.to(out.device), float("-inf"))
        return out


_MASKED_CLASSES: dict[type, type] = {}


def _masked_router_class(cls: type) -> type:
    if cls not in _MASKED_CLASSES:

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            mode = _RouterLogitMask(self.weight, self.secateur_expert_keep)
            with mode:
                out = cls.forward(self, *args, **kwargs)
            if mode.hits == 0:
                raise ConfigError(
                    f"router {cls.__name__} did not compute F.linear(x, weight); cannot mask it"
                )
            return out

        _MASKED_CLASSES[cls] = type(f"ExpertMasked{cls.__name__}", (cls,), {"forward": forward})
    return _MASKED_CLASSES[cls]


def mask_experts(model: nn.Module, removed: Mapping[str, Iterable[int]]) -> nn.Module:
    """In place: the routers of ``removed`` (``{block path: expert indices}``) give those experts a logit of
    ``-inf``, so they get routing probability 0 and are never selected (the reference the compacted
    model is checked against). The router's class is swapped for a subclass whose forward applies the
    mask (a bool buffer ``secateur_expert_keep`` of shape ``(E,)``); weights are not changed.

    Raises:
        ConfigError: as :func:`expert_plan`; at forward time, a router that does not compute its
            logits as ``F.linear(x, self.weight)``.
    """
    for b, rm in _resolve(model, removed):
        router = model.get_submodule(b.router_path)
        keep = torch.ones(b.num_experts, dtype=torch.bool, device=router.weight.device)
        keep[torch.as_tensor(rm, dtype=torch.long)] = False
        if "secateur_expert_keep" in router._buffers:
            router.secateur_expert_keep &= keep
        else:
            router.register_buffer("secateur_expert_keep", keep, persistent=False)
            router.__class__ = _masked_router_class(type(router))
    return model


@contextlib.contextmanager
def eager_experts(*models: nn.Module) -> Iterator[None]:
    """Run the experts of Hugging Face MoE ``models`` with transformers' ``"eager"`` implementation inside
    the block (a per-expert loop of ``F.linear``, which float64 supports; the default fused ``grouped_mm``
    does not on CPU), restoring each model's own implementation on exit. Models without the switch are
    left alone."""
    saved = []
    for m in models:
        get = getattr(m, "get_experts_implementation", None)
        if get is None:
            continue
        impl = get()
        if set(impl.values()) - {None, "eager"}:
            m.set_experts_implementation("eager")
            saved.append((m, impl))
    try:
        yield
    finally:
        for m, impl in reversed(saved):
            m.set_experts_implementation(impl)


def _example_inputs(batches: list[Batch]) -> dict[str, Any]:
    b = batches[0]
    return {"input_ids": b["input_ids"][:2], "attention_mask": b["attention_mask"][:2], "use_cache": False}


def remove_experts(
    model: nn.Module,
    data: Any = None,
    sparsity: float = 0.25,
    layers: Iterable[int] | None = None,
    reduction: str = "sum",
    scores: Mapping[str, Any] | None = None,
    removed: Mapping[str, Iterable[int]] | None = None,
    verify: bool = True,
    example_inputs: Any = None,
) -> tuple[nn.Module, dict]:
    """Remove the least salient experts of every selected MoE block, in place; returns ``(model, plan)``.

    In each selected block ``floor(sparsity * E)`` experts with the lowest :func:`expert_saliency` are
    removed (ties: lower index first). Removing the same number everywhere keeps the config uniform,
    so ``model.save_pretrained`` / ``from_pretrained`` reload it; otherwise save it with its plan
    (:func:`secateur.save` / :func:`secateur.load`).

    Args:
        data: tokenised calibration text (what :func:`secateur.llm.calibration.calibration_batches` accepts:
            a ``(batch, seq)`` id tensor, a tokeniser output or an iterable of them), used for the saliency
            and the oracle's inputs.
        sparsity: fraction of each block's experts to remove, in [0, 1).
        layers: decoder-layer indices whose MoE blocks are pruned (default: all).
        reduction: ``"sum"`` or ``"mean"`` (see :func:`expert_saliency`).
        scores: precomputed ``{block path: (E,) scores}`` (higher = keep) instead of the saliency.
        removed: explicit ``{block path: expert indices}`` (then ``sparsity`` and scores are not used).
        verify: check, inside the transaction, that the compacted model equals the model whose removed
            experts have router logits -inf (:func:`mask_experts`), in float64, with the oracle's rule
            (:func:`secateur.compact.check_equivalence`: finite, within 1e-6 × each output's magnitude).
        example_inputs: inputs of that check (default: the first two calibration sequences).

    Raises:
        ConfigError: bad sparsity/reduction/layers/paths, fewer than ``top_k`` experts left, no inputs for
            the check, or NaN/Inf in ``example_inputs`` (nothing is changed).
        CompactionError: compaction or the check failed; the model is restored bit-identical (also on a
            ``KeyboardInterrupt``, which is then re-raised).
    """
    batches = calibration_batches(data) if data is not None else None
    if removed is None:
        sparsity = check_sparsity(sparsity)
        blocks = find_moe_blocks(model)
        if layers is not None:
            wanted = {int(i) for i in layers}
            missing = wanted - {b.layer for b in blocks}
            if missing:
                raise ConfigError(f"layers {sorted(missing)} hold no MoE block in {type(model).__name__}")
            blocks = [b for b in blocks if b.layer in wanted]
        for b in blocks:
            if b.num_experts - int(math.floor(sparsity * b.num_experts + 1e-9)) < b.top_k:
                raise ConfigError(
                    f"{b.path}: removing {sparsity:.0%} of {b.num_experts} experts leaves fewer than "
                    f"top_k={b.top_k}"
                )
        if scores is None:
            if batches is None:
                raise ConfigError("remove_experts needs calibration text as data= (or scores= / removed=)")
            scores = expert_saliency(model, batches, reduction, blocks)
        removed = {}
        for b in blocks:
            s = np.asarray(torch.as_tensor(scores[b.path]).detach().cpu().double().numpy())
            if s.shape != (b.num_experts,):
                raise ConfigError(f"{b.path}: scores have shape {s.shape}, expected ({b.num_experts},)")
            k = int(math.floor(sparsity * b.num_experts + 1e-9))
            removed[b.path] = np.sort(np.argsort(s, kind="stable")[:k]).tolist()
    plan = expert_plan(model, removed)
    check = None
    if verify:
        if example_inputs is None:
            if batches is None:
                raise ConfigError("verify=True needs data= (calibration text) or example_inputs (the oracle)")
            example_inputs = _example_inputs(batches)
        require_finite_inputs(example_inputs)
        reference = mask_experts(copy.deepcopy(model), removed)

        def check(m: nn.Module) -> None:
            with eager_experts(reference, m):  # fused grouped_mm kernels refuse float64 on CPU
                check_equivalence(reference, m, example_inputs)

    compact(model, plan, check=check)
    return model, plan
