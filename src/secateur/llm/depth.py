"""Depth pruning: remove whole transformer blocks ranked by Block Influence (ShortGPT, Men et al. 2024).

"ShortGPT: Layers in Large Language Models are More Redundant Than You Expect", section 3.2, eq. (1): the
Block Influence of block ``i`` is

    BI_i = 1 - E_{X, t} [ x_{i,t}^T x_{i+1,t} / (||x_{i,t}||_2 ||x_{i+1,t}||_2) ],

``x_{i,t}`` the hidden state of token ``t`` entering block ``i`` and ``x_{i+1,t}`` the one leaving it; the
expectation runs over the calibration tokens (padding excluded). A block that barely turns the residual
stream has a BI near 0 and is removed first (section 3.3: "remove the layers with the lowest BI").

The surgery (:func:`remove_blocks`) makes a model that plain ``transformers`` reloads: the block
``ModuleList`` is replaced by one holding the kept blocks, the config's ``num_hidden_layers`` and its
per-layer lists (``layer_types``: Gemma 3's sliding / full attention, Qwen's sliding window, ...) keep the
entries of the kept blocks, index lists (``mlp_only_layers``) are renumbered, and every ``layer_idx`` /
``layer_id`` attribute inside the kept blocks (attention modules use it to address the key/value cache)
becomes the block's new position. It is a transaction (:class:`secateur.compact.Journal`): any exception,
``KeyboardInterrupt`` included, leaves the model as it was, bit for bit.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from secateur._validate import check_sparsity
from secateur.compact import Journal, restoring
from secateur.errors import ConfigError
from secateur.llm.calibration import calibration_batches
from secateur.llm.oneshot import block_output, find_blocks

__all__ = ["DepthReport", "block_influence", "prune_depth", "remove_blocks"]

#: Config lists with one entry per layer: the entries of the removed blocks are dropped.
PER_LAYER_KEYS = (
    "layer_types",
    "mlp_layer_types",
    "no_rope_layers",
    "layers_block_type",
    "num_attention_heads_per_layer",
    "num_key_value_heads_per_layer",
)
#: Config lists of layer indices: removed indices are dropped, the others renumbered.
LAYER_INDEX_KEYS = ("mlp_only_layers",)
#: Module attributes holding the module's layer index (the KV cache is addressed by ``layer_idx``).
LAYER_INDEX_ATTRS = ("layer_idx", "layer_id")


@dataclass
class DepthReport:
    """Outcome of :func:`prune_depth`.

    ``influence``: BI of every block of the original stack (float, in [0, 2]); ``removed`` / ``kept``: the
    original indices, ascending; ``n_tokens``: calibration tokens counted; ``params_before`` /
    ``params_after``: parameters of the model (each tensor once); ``seconds``: wall time.
    """

    blocks: str
    influence: list[float]
    removed: list[int]
    kept: list[int]
    n_tokens: int
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0
    config_changes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@torch.no_grad()
def block_influence(model: nn.Module, data: Any, *, blocks: str | None = None) -> list[float]:
    """Block Influence ``BI_i = 1 - mean_t cos(x_i, x_{i+1})`` of every block (ShortGPT, eq. 1).

    One forward pass per calibration batch (eval mode, no key/value cache) with hooks on every block:
    the cosine between the hidden state entering and leaving the block is taken per real token (the
    batch's ``attention_mask``) in float64 and averaged over all of them.

    Args:
        model: a ``transformers`` model (or any model whose blocks are a ModuleList, see ``blocks``) called
            as ``model(input_ids=..., attention_mask=...)``.
        data: calibration batches in any form :func:`secateur.llm.calibration.calibration_batches` takes
            (a ``(batch, seq)`` id tensor, a tokeniser output, or an iterable of them).
        blocks: attribute path of the ModuleList of blocks (found automatically if None).

    Returns:
        One float per block, in stack order (0 for a block that returns its input).

    Raises:
        ConfigError: no blocks found, bad data, a block output that is not a tensor (or a tuple starting
            with one), or a block the forward pass never reached (named).
    """
    path, block_list = find_blocks(model, blocks)
    batches = calibration_batches(data)
    sums = [0.0] * len(block_list)
    counts = [0] * len(block_list)
    current: dict[str, Any] = {"mask": None, "inputs": {}}

    def pre_hook(i: int):
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            h = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(h, torch.Tensor):
                raise ConfigError(f"{path}.{i} was called without hidden states")
            current["inputs"][i] = h.detach()

        return hook

    def post_hook(i: int):
        def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
            x, y = current["inputs"].pop(i).double(), block_output(out).detach().double()
            cos = F.cosine_similarity(x, y, dim=-1)
            m = current["mask"]
            if m is not None and tuple(m.shape) == tuple(cos.shape):
                cos = cos[m.to(cos.device)]
            sums[i] += float(cos.sum())
            counts[i] += cos.numel()

        return hook

    handles = []
    for i, b in enumerate(block_list):
        handles.append(b.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(b.register_forward_hook(post_hook(i)))
    accepts_cache = "use_cache" in inspect.signature(model.forward).parameters
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            current["mask"] = batch["attention_mask"].bool()
            call: dict[str, Any] = dict(batch)
            if accepts_cache:
                call["use_cache"] = False
            model(**call)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [f"{path}.{i}" for i, c in enumerate(counts) if c == 0]
    if missing:
        raise ConfigError(f"the calibration pass never reached {', '.join(missing[:3])} (no real token)")
    return [1.0 - s / c for s, c in zip(sums, counts)]


def _layer_config(model: nn.Module, n_blocks: int, path: str) -> Any:
    """The config describing the block stack (the text config of a multimodal model), or None."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    n = getattr(cfg, "num_hidden_layers", None)
    if n is None:
        return None
    if n != n_blocks:
        raise ConfigError(
            f"config.num_hidden_layers is {n} but {path} holds {n_blocks} blocks: depth pruning rewrites the "
            "config of the stack it prunes; pass blocks= naming the stack the config describes"
        )
    return cfg


def _config_changes(cfg: Any, kept: list[int], n_blocks: int) -> dict[str, Any]:
    """The config attributes to rewrite for keeping blocks ``kept`` of ``n_blocks`` (validated, not applied).

    Raises:
        ConfigError: a list attribute whose name mentions layers, with one entry per layer, that depth
            pruning does not know how to rewrite (named).
    """
    if cfg is None:
        return {}
    changes: dict[str, Any] = {"num_hidden_layers": len(kept)}
    new_index = {old: new for new, old in enumerate(kept)}
    for key, value in vars(cfg).items():
        if not isinstance(value, (list, tuple)):
            continue
        if key in PER_LAYER_KEYS and len(value) == n_blocks:
            changes[key] = type(value)(value[i] for i in kept)
        elif key in LAYER_INDEX_KEYS:
            changes[key] = type(value)(new_index[i] for i in value if i in new_index)
        elif "layer" in key and len(value) == n_blocks:
            raise ConfigError(
                f"config.{key} has one entry per layer and depth pruning does not know what it means; "
                f"known per-layer keys: {', '.join(PER_LAYER_KEYS)}"
            )
    return changes


def _check_indices(indices: Sequence[int], n_blocks: int, path: str) -> list[int]:
    out = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ConfigError(f"block indices must be ints, got {i!r}")
        if not 0 <= i < n_blocks:
            raise ConfigError(f"block index {i} out of range: {path} has blocks 0..{n_blocks - 1}")
        out.append(i)
    if len(set(out)) != len(out):
        raise ConfigError(f"block indices repeat: {sorted(out)}")
    if len(out) >= n_blocks:
        raise ConfigError(f"cannot remove {len(out)} of the {n_blocks} blocks of {path}: one must stay")
    return sorted(out)


def _parent(model: nn.Module, path: str) -> tuple[Any, str]:
    obj: Any = model
    parts = path.split(".")
    for part in parts[:-1]:
        obj = getattr(obj, part)
    return obj, parts[-1]


def remove_blocks(
    model: nn.Module, indices: Sequence[int], *, blocks: str | None = None
) -> dict[str, Any]:
    """Remove the blocks at ``indices`` (positions in the stack) from ``model``, in place.

    The block ``ModuleList`` is replaced by one holding the kept blocks in order (the removed blocks are
    no longer referenced by the model); ``config.num_hidden_layers`` (of the text config for a multimodal
    model) becomes the number kept, per-layer config lists (:data:`PER_LAYER_KEYS`) keep the kept entries,
    index lists (:data:`LAYER_INDEX_KEYS`) are renumbered, and each ``layer_idx`` / ``layer_id`` inside a
    kept block equal to its old position becomes its new one. ``save_pretrained`` then writes a checkpoint
    that ``AutoModelForCausalLM.from_pretrained`` rebuilds with the same outputs.

    Returns:
        The config attributes rewritten, ``{name: new value}`` (empty for a model without a config).

    Raises:
        ConfigError: no blocks found, an index that is not an int in range, a repeated index, every
            block removed, a config whose ``num_hidden_layers`` is not the stack's length, or a per-layer
            config list of unknown meaning (named). Checked before any change; the change itself is a
            transaction: any exception or ``KeyboardInterrupt`` restores the model and config bit-identical.
    """
    path, block_list = find_blocks(model, blocks)
    n_blocks = len(block_list)
    removed = _check_indices(indices, n_blocks, path)
    kept = [i for i in range(n_blocks) if i not in set(removed)]
    cfg = _layer_config(model, n_blocks, path)
    changes = _config_changes(cfg, kept, n_blocks)
    if not removed:
        return {}
    parent, attr = _parent(model, path)
    journal = Journal()
    with restoring(journal.rollback):
        journal.set_attr(parent, attr, nn.ModuleList([block_list[i] for i in kept]))
        for new, old in enumerate(kept):
            if new == old:
                continue
            for mod in block_list[old].modules():
                for a in LAYER_INDEX_ATTRS:
                    v = getattr(mod, a, None)
                    if isinstance(v, int) and not isinstance(v, bool) and v == old:
                        journal.set_attr(mod, a, new)
        for key, value in changes.items():
            journal.set_attr(cfg, key, value)
    return changes


def _n_to_remove(n_blocks: int | None, sparsity: float | None, total: int) -> int:
    if (n_blocks is None) == (sparsity is None):
        raise ConfigError("give exactly one of n_blocks (how many blocks to remove) and sparsity (fraction)")
    if sparsity is not None:
        return math.floor(check_sparsity(sparsity, "sparsity (fraction of blocks)") * total)
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 0:
        raise ConfigError(f"n_blocks must be an int >= 0, got {n_blocks!r}")
    if n_blocks >= total:
        raise ConfigError(f"n_blocks={n_blocks} would remove every block: the model has {total}")
    return n_blocks


def prune_depth(
    model: nn.Module,
    data: Any,
    n_blocks: int | None = None,
    *,
    sparsity: float | None = None,
    blocks: str | None = None,
) -> DepthReport:
    """Remove the ``n_blocks`` blocks of lowest Block Influence (ShortGPT, Men et al. 2024, section 3.3).

    :func:`block_influence` on ``data``, then :func:`remove_blocks` of the lowest (ties: the earlier block
    first). ``sparsity`` instead of ``n_blocks``: the fraction of blocks to remove,
    ``floor(sparsity * n)``. The model is changed in place and stays a plain ``transformers`` model.

    Args:
        model: e.g. ``Gemma3ForCausalLM`` / ``LlamaForCausalLM``.
        data: calibration batches (see :func:`block_influence`).
        n_blocks: how many blocks to remove, ``0 <= n_blocks < number of blocks``.
        sparsity: fraction of the blocks to remove, in [0, 1).
        blocks: attribute path of the block ModuleList (found automatically if None).

    Returns:
        :class:`DepthReport`.

    Raises:
        ConfigError: both or neither of ``n_blocks`` / ``sparsity``, ``n_blocks`` not an int in
            ``[0, number of blocks)``, a sparsity outside [0, 1), and the errors of :func:`block_influence`
            and :func:`remove_blocks`. All are raised before the model changes.
    """
    t0 = time.perf_counter()
    path, block_list = find_blocks(model, blocks)
    total = len(block_list)
    n = _n_to_remove(n_blocks, sparsity, total)
    _config_changes(_layer_config(model, total, path), list(range(total - n)), total)  # refuse early
    batches = calibration_batches(data)
    influence = block_influence(model, batches, blocks=path)
    order = sorted(range(total), key=lambda i: (influence[i], i))
    removed = sorted(order[:n])
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    before = _n_params(model)
    changes = remove_blocks(model, removed, blocks=path)
    return DepthReport(
        blocks=path,
        influence=influence,
        removed=removed,
        kept=[i for i in range(total) if i not in set(removed)],
        n_tokens=n_tokens,
        params_before=before,
        params_after=_n_params(model),
        seconds=time.perf_counter() - t0,
        config_changes=changes,
    )
