"""Hugging Face layout for pruned models: ``save_pretrained`` / ``from_pretrained`` with the plan alongside.

A folder written by :func:`save_pretrained` is what ``model.save_pretrained(folder)`` writes (``config.json``,
``model.safetensors`` or its shards with ``model.safetensors.index.json``, ``generation_config.json``)
plus secateur's ``plan.json``: the *original* (unpruned) config and class, the structural pruning plan
(:func:`secateur.compact.make_plan`) and ``"layout": "huggingface"``. :func:`from_pretrained` rebuilds the
dense architecture from the original config, re-applies the plan with the same transactional compaction
that pruned it, and loads the weights strictly: outputs are reproduced bit for bit.

Why the plan is needed: Hugging Face configs hold one head count and one FFN width for every layer, and
models such as BERT and GPT-2 derive the head width as ``hidden_size / num_attention_heads`` (no
``head_dim`` key, and transformers 5 has no ``pruned_heads``). A model whose heads or FFN neurons were
pruned differently per layer, or uniformly in such a model, cannot be described by its config alone.

What plain ``transformers`` does with such a folder (tested in ``tests/test_hf_heads.py``):

- ``config.json`` is the pruned model's own config: :func:`secateur.compact.compact` writes a new value
  only where every layer agrees (and adds ``head_dim`` when heads were pruned), otherwise the dense value
  stays. When this config builds exactly the pruned shapes and head attributes (e.g. Llama, Qwen2, Mistral
  pruned uniformly: they read ``head_dim``), ``AutoModel...from_pretrained(folder)`` works as usual and
  ``plan.json`` records ``"transformers_loadable": true``.
- Otherwise (BERT, GPT-2, any non-uniform pruning) the model transformers builds from ``config.json`` has
  different tensor shapes, and ``from_pretrained`` raises (transformers refuses mismatched sizes unless
  ``ignore_mismatched_sizes=True``, which would re-initialise them: do not pass it). :func:`save_pretrained`
  checks before writing that one of these two cases holds, so a folder never loads silently wrong, and
  records ``"transformers_loadable": false``.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from secateur.errors import SerializationError
from secateur.io.serialization import (
    FORMAT,
    PLAN_FILE,
    VERSION,
    _apply_plan,
    _open_folder,
    _plan_text,
    _read_safetensors,
    _refuse_pickle,
    architecture_of,
    build_architecture,
)

LAYOUT = "huggingface"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

__all__ = ["from_pretrained", "save_pretrained", "transformers_loadable"]


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _shape_diff(a: dict[str, tuple[int, ...]], b: dict[str, tuple[int, ...]]) -> str | None:
    """The first difference between two ``{name: shape}`` maps as text, or None when they are equal."""
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            return f"{k}: {a.get(k, 'absent')} (rebuilt) vs {b.get(k, 'absent')} (model)"
    return None


def _meta_build(arch: dict[str, Any]) -> nn.Module:
    """The architecture of an :func:`architecture_of` record on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return build_architecture(arch)


def _attributes_match(model: nn.Module, plan: dict | None) -> bool:
    """Whether ``model`` (built from a config) has every module attribute value ``plan`` set."""
    for path, attrs in ((plan or {}).get("attributes") or {}).items():
        try:
            mod = model.get_submodule(path) if path else model
        except AttributeError:
            return False
        for name, (_old, new) in attrs.items():
            if getattr(mod, name, None) != new:
                return False
    return True


def transformers_loadable(model: nn.Module, plan: dict | None = None) -> bool:
    """Whether plain ``type(model).from_pretrained`` on the model's current config rebuilds ``model``.

    True when the class built from ``model.config`` (on the meta device) has exactly the same state-dict
    names and shapes as ``model`` and the module attributes that ``plan`` changed (head counts, widths).
    False means transformers would meet mismatched shapes and raise.

    Args:
        model: a Hugging Face ``PreTrainedModel``, pruned or not.
        plan: the plan that was applied to it (its ``"attributes"`` are checked too); optional.
    """
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return False
    cls = type(model)
    arch = {
        "kind": "huggingface",
        "class": f"{cls.__module__}:{cls.__qualname__}",
        "config_class": f"{type(cfg).__module__}:{type(cfg).__qualname__}",
        "config": cfg.to_dict(),
    }
    try:
        ref = _meta_build(arch)
    except Exception:  # a config transformers itself rejects (e.g. hidden_size % heads != 0)
        return False
    return _shape_diff(_shapes(ref), _shapes(model)) is None and _attributes_match(ref, plan)


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike[str],
    plan: dict | None = None,
    *,
    metadata: dict | None = None,
    **save_kwargs: Any,
) -> Path:
    """Save a (pruned) Hugging Face model in the Hugging Face layout plus secateur's ``plan.json``.

    Writes what ``model.save_pretrained(directory, **save_kwargs)`` writes (``config.json``, safetensors
    weights, possibly sharded with ``max_shard_size``), then ``plan.json`` (written last, atomically).
    Reload with :func:`from_pretrained` (or :func:`secateur.load`); see the module docstring for what
    plain ``transformers`` does with the folder.

    Args:
        model: a ``transformers.PreTrainedModel``, compacted by ``plan`` (or unpruned with ``plan=None``).
            Element masks must be baked first (``Pruner.remove()``); the model is not changed.
        directory: the output folder (created if missing).
        plan: the structural plan applied to the model (``prune_channels`` returns it,
            ``ChannelPruner.plan`` after ``compact()``).
        metadata: extra JSON-able data stored in plan.json.
        save_kwargs: passed to ``model.save_pretrained`` (e.g. ``max_shard_size="200MB"``).

    Returns the folder path.

    Raises:
        SerializationError: ``model`` is not a Hugging Face model; it still carries masks (names the
            module); the plan does not turn the original architecture into ``model``'s shapes (names the
            first differing tensor, also when a compacted model comes without its plan); metadata is not
            JSON-serialisable. Nothing is written then.
    """
    if not (hasattr(model, "save_pretrained") and hasattr(getattr(model, "config", None), "to_dict")):
        raise SerializationError(
            f"save_pretrained needs a Hugging Face PreTrainedModel, got {type(model).__name__}; "
            "use secateur.save for other models"
        )
    for path, mod in model.named_modules():
        if parametrize.is_parametrized(mod):
            names = list(mod.parametrizations.keys())
            raise SerializationError(
                f"module {path or '<root>'!r} still has masks on {names}: bake them first "
                "(Pruner.remove() / ChannelPruner.compact()), or use secateur.save, which keeps masks"
            )
    arch = architecture_of(model, plan)
    ref = _meta_build(arch)
    _apply_plan(ref, plan, f"the plan does not fit {type(model).__name__}'s original config")
    diff = _shape_diff(_shapes(ref), _shapes(model))
    if diff is not None:
        hint = " (a compacted model needs its plan: pass plan=...)" if not plan else ""
        raise SerializationError(
            f"the plan applied to the original {type(model).__name__} does not give this model's shapes: "
            f"{diff}{hint}"
        )
    loadable = transformers_loadable(model, plan)
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "layout": LAYOUT,
        "architecture": arch,
        "plan": plan,
        "masks": [],
        "transformers_loadable": loadable,
        "metadata": metadata or {},
    }
    text = _plan_text(doc)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if "save_original_format" in inspect.signature(model.save_pretrained).parameters:
        # transformers 5 would rename fused tensors back to a legacy layout (MoE experts as one tensor per
        # expert) that from_pretrained cannot read without transformers' own converters; the model's own
        # names load in both (transformers' loader passes them through unchanged)
        save_kwargs.setdefault("save_original_format", False)
    try:
        model.save_pretrained(directory, **save_kwargs)
    except Exception as e:  # transformers validates the config (e.g. hidden size vs head count) on save
        raise SerializationError(
            f"transformers refused to save {type(model).__name__} into {directory}: {e}. A pruned width "
            "its config must divide (hidden_size by num_attention_heads) can be kept a multiple with "
            "round_to=..., or save with secateur.save, which rebuilds from the original config"
        ) from e
    tmp = directory / (PLAN_FILE + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, directory / PLAN_FILE)
    return directory


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face safetensors checkpoint (single file or sharded with an index)."""
    single, index = directory / WEIGHTS_FILE, directory / INDEX_FILE
    if single.exists():
        files = [single]
    elif index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise SerializationError(f"{index}: not a safetensors index ({e!r})") from e
        files = [directory / f for f in sorted(set(weight_map.values()))]
    else:
        for other in sorted(directory.glob("*.bin")) + sorted(directory.glob("*.pt")):
            _refuse_pickle(other)
        raise SerializationError(f"{directory}: no {WEIGHTS_FILE} nor {INDEX_FILE}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(_read_safetensors(f, missing=f"missing (listed in {INDEX_FILE})"))
    return tensors


def _load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Load ``tensors`` into ``model``; a missing key is allowed only for a tied alias of a loaded one
    (Hugging Face writes tied weights once)."""
    floats = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(floats) == 1:
        model.to(floats.pop())
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:
        raise SerializationError(f"{where}: weights do not fit the rebuilt model: {e}") from e
    if result.unexpected_keys:
        raise SerializationError(f"{where}: tensors the rebuilt model lacks: {result.unexpected_keys[:5]}")
    owner: dict[int, list[str]] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False)
    ):
        owner.setdefault(id(t), []).append(name)
    by_name = {n: ids for ids, names in owner.items() for n in names}
    missing = [k for k in result.missing_keys if not any(n in tensors for n in owner.get(by_name.get(k), []))]
    if missing:
        raise SerializationError(f"{where}: tensors missing for {missing[:5]}")


def from_pretrained(directory: str | os.PathLike[str]) -> nn.Module:
    """Rebuild a model written by :func:`save_pretrained` (a folder of :func:`secateur.save` works too, via
    :func:`secateur.load`).

    Steps: read ``plan.json``; build the original class from the original config; re-apply the plan
    (:func:`secateur.compact.compact`: tensors sliced, head counts / widths / config updated); cast to the
    checkpoint's dtype; load the safetensors weights (tied aliases may be absent, nothing else). Returns
    the model in eval mode, as transformers' ``from_pretrained`` does.

    Raises:
        SerializationError: missing/truncated/pickle files, a plan that does not fit the rebuilt model,
            or weights whose names or shapes do not fit; the message names the file at fault.
    """
    directory, doc = _open_folder(directory, "secateur.save_pretrained")
    if doc.get("layout") != LAYOUT:
        from secateur.io.serialization import load

        return load(directory).eval()
    arch = doc["architecture"]
    if arch.get("kind") != "huggingface":
        raise SerializationError(
            f"{directory / PLAN_FILE}: architecture kind {arch.get('kind')!r}, expected huggingface"
        )
    tensors = _read_weights(directory)
    model = build_architecture(arch)
    _apply_plan(model, doc.get("plan"), f"{directory / PLAN_FILE}: the plan does not fit the model")
    _load_weights(model, tensors, directory)
    return model.eval()
