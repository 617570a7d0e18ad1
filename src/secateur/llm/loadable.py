"""Whether a pruned Hugging Face model's own ``config.json`` describes it, checked before and after pruning.

A Hugging Face config holds one ``num_attention_heads``, one ``num_key_value_heads`` and one
``intermediate_size`` for every layer, and plain ``transformers`` ``from_pretrained`` builds the model from it
before loading the weights. A structurally pruned model is therefore loadable by plain ``transformers`` only
when every layer has the same counts and the class reads them from the config (Llama, Qwen2, Mistral, Gemma 3
read ``head_dim`` too; GPT-2 derives its head width from ``n_embd / n_head`` and cannot express pruned heads).

- :func:`planned_config_mismatch` answers, *before* anything is changed, whether the config a plan rewrites
  builds the pruned shapes (a meta-device build compared with the plan's shapes): ``prune_decoder(...,
  uniform=True)`` refuses with a named :class:`~secateur.errors.ConfigError` when it does not.
- :func:`refuse_plain_save` makes, *after* pruning, the model's own ``save_pretrained`` raise
  :class:`UnloadableConfigError` (naming the config field and how to reach a loadable shape) when the
  config cannot describe it, instead of writing a folder that ``from_pretrained`` refuses later.
  :func:`secateur.save_pretrained` (which writes the plan beside the weights) and :func:`secateur.save` keep
  working: they rebuild the model from the original config and the plan.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from secateur.io.pretrained import UnloadableConfigError, transformers_load_problems, transformers_loadable

__all__ = ["PlainSaveRefusal", "UnloadableConfigError", "planned_config_mismatch", "refuse_plain_save"]

_HOW = (
    "prune every layer alike (secateur.llm.prune_decoder(..., uniform=True): the same number of heads, KV "
    "heads and MLP channels in every layer; round_to=... keeps MLP widths multiples of it), or save with "
    "secateur.save_pretrained / secateur.save, which write the plan beside the weights "
    "(secateur.from_pretrained / secateur.load rebuild the model)"
)


def _rewritten_config(model: nn.Module, plan: Mapping) -> Any:
    """``model.config`` with the plan's config changes (``_inconsistent_`` keys skipped), rebuilt the way
    ``from_pretrained`` builds a config: ``from_dict`` of its dict, so transformers' own validation runs (e.g.
    ``hidden_size`` must be a multiple of ``num_attention_heads``, even where ``head_dim`` is explicit)."""
    d = copy.deepcopy(model.config.to_dict())
    for ck, changes in (plan.get("config") or {}).items():
        target = d if ck == "" else d.get(ck)
        if not isinstance(target, dict):
            continue
        for k, (_old, new) in changes.items():
            if not k.startswith("_inconsistent_"):
                target[k] = new
    return type(model.config).from_dict(d)


def _planned_shapes(model: nn.Module, plan: Mapping) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes ``model`` will have once ``plan`` is applied (tied tensors under every name)."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(dict(model.named_buffers(remove_duplicate=False)))
    dims_of = {id(named[name]): dims for name, dims in plan["tensors"].items() if name in named}
    out = {}
    for key, t in model.state_dict(keep_vars=True).items():
        shape = list(t.shape)
        for d, kept in dims_of.get(id(t), {}).items():
            shape[int(d)] = len(kept)
        out[key] = tuple(shape)
    return out


def _changed_fields(plan: Mapping) -> str:
    parts = [
        f"{k} {old} -> {new}" for d in (plan.get("config") or {}).values() for k, (old, new) in d.items()
    ]
    return ", ".join(parts) or "no field changed"


def _inconsistent(plan: Mapping) -> list[str]:
    """``"num_attention_heads (the layers now have 2 or 4)"`` for each config field that cannot hold one
    value for every layer."""
    return [
        f"{k.removeprefix('_inconsistent_')} (the layers now have {' or '.join(map(str, new))})"
        for d in (plan.get("config") or {}).values()
        for k, (_old, new) in d.items()
        if k.startswith("_inconsistent_")
    ]


def planned_config_mismatch(model: nn.Module, plan: Mapping) -> str | None:
    """Why the config ``plan`` rewrites would not rebuild the pruned model, or None when it would.

    Builds ``type(model)`` from a copy of ``model.config`` with the plan's config changes on the meta device
    (no memory, no initialisation) and compares its state-dict shapes with the shapes ``plan`` gives and its
    module attributes with those the plan sets. ``model`` is not changed.

    Returns a sentence naming the config field that cannot hold per-layer values, or the first tensor whose
    shape differs (and the config fields the plan changed); None if plain ``from_pretrained`` would
    rebuild the pruned model.
    """
    bad = _inconsistent(plan)
    if bad:
        return f"a config holds one value for every layer, of {'; '.join(bad)}"
    try:
        with torch.device("meta"):
            ref = type(model)(_rewritten_config(model, plan))
    except Exception as e:  # transformers rejects the rewritten config itself
        return f"transformers rejects the rewritten config ({_changed_fields(plan)}): {e}"
    want, got = _planned_shapes(model, plan), {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    for k in sorted(set(want) | set(got)):
        if want.get(k) != got.get(k):
            return (
                f"from the rewritten config ({_changed_fields(plan)}) transformers builds {k} with shape "
                f"{got.get(k, 'absent')}, the pruned model has {want.get(k, 'absent')}"
            )
    for path, attrs in (plan.get("attributes") or {}).items():
        mod = ref.get_submodule(path)
        for a, (_old, new) in attrs.items():
            if getattr(mod, a, None) != new:
                return (
                    f"{path}.{a} is {getattr(mod, a, None)} when built from the rewritten config, not {new}"
                )
    return None


class PlainSaveRefusal:
    """Stands in for a pruned model's own ``save_pretrained`` when its config cannot describe it: calling it
    raises :class:`UnloadableConfigError` with ``message`` before anything is written. Installed and removed
    by :func:`refuse_plain_save`; picklable and deep-copyable (it holds only the message)."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        """Raise :class:`UnloadableConfigError` (nothing is written)."""
        raise UnloadableConfigError(self.message)


def refuse_plain_save(model: nn.Module, plan: Mapping) -> bool:
    """After a structural plan was applied to a Hugging Face model: make ``model.save_pretrained`` raise
    :class:`UnloadableConfigError` if plain ``from_pretrained`` of its ``config.json`` would not rebuild it
    (:func:`secateur.io.transformers_loadable`), else remove such a refusal left by an earlier pruning.

    The refusal is an instance attribute (:class:`PlainSaveRefusal`) shadowing the class's method;
    :func:`secateur.save_pretrained` calls the class's method and writes the plan beside the weights, so it
    (and :func:`secateur.save`) still save the model. Returns True when the refusal is installed.
    """
    if not (hasattr(model, "save_pretrained") and hasattr(getattr(model, "config", None), "to_dict")):
        return False
    if isinstance(model.__dict__.get("save_pretrained"), PlainSaveRefusal):
        del model.__dict__["save_pretrained"]
    if transformers_loadable(model, dict(plan)):
        return False
    bad = _inconsistent(plan)
    fields = transformers_load_problems(model, dict(plan))
    why = (
        f"a config holds one value for every layer, of {'; '.join(bad)}"
        if bad
        else f"its config ({_changed_fields(plan)}) does not describe the pruned shapes: {'; '.join(fields)}"
    )
    message = (
        f"{type(model).__name__} was pruned to a shape its config.json cannot describe: {why}, so plain "
        f"transformers from_pretrained would build other shapes. Nothing was written. To get a folder plain "
        f"transformers loads, {_HOW}"
    )
    model.__dict__["save_pretrained"] = PlainSaveRefusal(message)
    return True
