"""Whether a pruned Hugging Face model's own ``config.json`` describes it: checked before pruning (from the
plan) and enforced after it (the model's own ``save_pretrained``).

A Hugging Face config holds one ``num_attention_heads``, one ``num_key_value_heads`` and one MLP width for
every layer, and plain ``transformers`` ``from_pretrained`` builds the model from it before loading the
weights. A structurally pruned model is loadable by plain ``transformers`` only when every layer has the same
counts and the family reads them from the config (:mod:`secateur.compact.hf_configs` says which field each
family derives instead).

- :func:`planned_config_mismatch` / :func:`planned_load_problems` answer *before* anything is changed whether
  the config a plan rewrites builds the pruned shapes (a meta-device build compared with the plan's shapes):
  ``prune_channels(..., loadable=True)``, ``prune_heads(..., loadable=True)`` and ``prune_decoder(...,
  uniform=True)`` refuse with :class:`UnloadableShapeError` / ``ConfigError`` naming the field when not.
- :func:`refuse_plain_save` makes, *after* pruning, the model's own ``save_pretrained`` raise
  :class:`~secateur.io.pretrained.UnloadableConfigError` (naming the config field and how to reach a loadable
  shape) when the config cannot describe the model, instead of writing a folder whose ``config.json`` builds
  other shapes. It is an instance attribute shadowing the class's method, not a patch of ``transformers``:
  :func:`secateur.save_pretrained` (which writes the plan beside the weights) and :func:`secateur.save` call
  the class's method and keep working.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Mapping
from typing import Any

from torch import nn

from secateur.compact.hf_configs import unexpressible_fields
from secateur.errors import ConfigError
from secateur.io.pretrained import (
    UnloadableConfigError,
    meta_build,
    transformers_load_problems,
)

__all__ = [
    "HOW_TO_LOAD",
    "PlainSaveRefusal",
    "UnloadableShapeError",
    "is_hf_model",
    "planned_config_mismatch",
    "planned_load_problems",
    "plain_save_problems",
    "refuse_plain_save",
]

#: How to reach a shape plain ``transformers`` loads (appended to every refusal).
HOW_TO_LOAD = (
    "prune every layer alike (prune_channels/prune_heads(..., loadable=True) or "
    "secateur.llm.prune_decoder(..., uniform=True): the same number of heads, KV heads and MLP channels in "
    "every layer; round_to=... keeps widths multiples of it), or save with secateur.save_pretrained / "
    "secateur.save, which write the plan "
    "beside the weights (secateur.from_pretrained / secateur.load rebuild the model)"
)


class UnloadableShapeError(ConfigError):
    """``loadable=True`` asked for a pruned Hugging Face model its ``config.json`` cannot describe (layers
    pruned to different counts, or a family that derives a pruned width from another field). Raised before
    anything is changed; the message names each config field at fault and how to reach a loadable shape."""


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` looks like a ``transformers`` ``PreTrainedModel`` (a ``save_pretrained`` method and
    a ``config`` with ``to_dict``); no import of ``transformers`` is needed."""
    return hasattr(model, "save_pretrained") and hasattr(getattr(model, "config", None), "to_dict")


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
        ref = meta_build(type(model), _rewritten_config(model, plan))
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


def planned_load_problems(model: nn.Module, plan: Mapping) -> list[str]:
    """Why plain ``transformers`` could not rebuild ``model`` once ``plan`` is applied, one sentence per
    config field at fault with how to reach a loadable shape; ``[]`` when it could
    (:func:`planned_config_mismatch` is None). ``model`` is not changed.

    The sentences are the family's (:func:`secateur.compact.hf_configs.unexpressible_fields`: head size
    derived as ``hidden / heads``, Bloom's and MPT's MLP of ``4 x hidden``), the fields the layers disagree on
    (``_inconsistent_`` keys), else the meta-build mismatch itself.
    """
    why = planned_config_mismatch(model, plan)
    if why is None:
        return []
    out = [
        f"{k.removeprefix('_inconsistent_')}: the layers would have {' or '.join(map(str, new))}, a config "
        "holds one value for every layer; prune every layer alike (allocation='uniform', the same group "
        "sizes in every layer: protect nothing in only some layers)"
        for d in (plan.get("config") or {}).values()
        for k, (_old, new) in d.items()
        if k.startswith("_inconsistent_")
    ]
    shapes = _planned_shapes(model, plan)
    sections = dict(plan.get("config") or {})
    sections.setdefault("", {})  # a family may lack a field for what was pruned: no change recorded
    for ck, changes in sections.items():
        sub = model.config if ck == "" else getattr(model.config, ck, None)
        if sub is None:
            continue
        planned = {k: v for k, v in changes.items() if not k.startswith("_inconsistent_")}
        out += unexpressible_fields(getattr(sub, "model_type", None), sub, planned, shapes)
    if not out and why.startswith("transformers rejects"):
        why += (
            "; choose counts transformers accepts (a head count that divides the hidden size: another "
            "sparsity or round_to), or leave the heads whole"
        )
    return out or [_unwritable_tensors(model, plan, shapes) or why]


def _unwritable_tensors(model: nn.Module, plan: Mapping, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """A sentence naming the pruned tensors whose width no config field sets (the rewritten config builds
    them dense, e.g. BERT's pooler) and the ``protect=`` that leaves their modules whole; None if the
    rewritten config cannot be built or every shape matches."""
    try:
        ref = meta_build(type(model), _rewritten_config(model, plan))
    except Exception:  # named by planned_config_mismatch
        return None
    got = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    keys = [k for k in sorted(set(shapes) | set(got)) if shapes.get(k) != got.get(k)]
    if not keys:
        return None
    modules = sorted({k.rpartition(".")[0] for k in keys})
    return (
        f"no config field of {getattr(model.config, 'model_type', None) or type(model).__name__} sets the "
        f"pruned width of {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''} (from the rewritten config "
        f"transformers builds {keys[0]} with shape {got.get(keys[0], 'absent')}, the pruned model has "
        f"{shapes.get(keys[0], 'absent')}); leave those modules whole with protect={modules[:4]!r}"
    )


class PlainSaveRefusal:
    """Stands in for a pruned Hugging Face model's own ``save_pretrained``: when called, it checks whether
    plain ``from_pretrained`` of the model's ``config.json`` would rebuild the model as it is now
    (:func:`~secateur.io.pretrained.transformers_load_problems`, one meta-device build) and either raises
    :class:`~secateur.io.pretrained.UnloadableConfigError` naming the config fields at fault, before anything
    is written, or calls the class's own ``save_pretrained``.

    The check runs at save time, not after every pruning call: pruning stays free of it, and it sees the
    model as it is saved. Installed by :func:`refuse_plain_save`. It holds a weak reference to the model
    (a strong one would make a reference cycle: a deleted model, GPU memory included, would wait for the
    cyclic garbage collector); ``copy.deepcopy`` and pickling give a guard of the copy, not of the
    original."""

    def __init__(self, model: nn.Module, plan: Mapping) -> None:
        self._model = weakref.ref(model)
        self.plan = dict(plan)

    @property
    def model(self) -> nn.Module:
        """The guarded model; ``ReferenceError`` once it no longer exists."""
        model = self._model()
        if model is None:
            raise ReferenceError("the model whose save_pretrained this was no longer exists")
        return model

    def __getstate__(self) -> dict[str, Any]:
        """The model itself (copied or pickled with it: the copy's guard guards the copy) and the plan."""
        return {"model": self.model, "plan": self.plan}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._model = weakref.ref(state["model"])
        self.plan = state["plan"]

    def problems(self) -> list[str]:
        """One sentence per config field that cannot describe the model as it is now; ``[]`` if plain
        ``from_pretrained`` rebuilds it."""
        return transformers_load_problems(self.model, self.plan)

    def message(self) -> str | None:
        """The refusal :meth:`__call__` raises, or None when the config describes the model."""
        fields = self.problems()
        if not fields:
            return None
        bad = _inconsistent(self.plan)
        why = (
            f"a config holds one value for every layer, of {'; '.join(bad)}"
            if bad
            else f"its config ({_changed_fields(self.plan)}) does not describe the pruned shapes: "
            f"{'; '.join(fields)}"
        )
        return (
            f"{type(self.model).__name__} was pruned to a shape its config.json cannot describe: {why}, so "
            f"plain transformers from_pretrained would build other shapes. Nothing was written. To get a "
            f"folder plain transformers loads, {HOW_TO_LOAD}"
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Save with the class's own ``save_pretrained``, or raise
        :class:`~secateur.io.pretrained.UnloadableConfigError` (nothing written)."""
        message = self.message()
        if message is not None:
            raise UnloadableConfigError(message)
        return type(self.model).save_pretrained(self.model, *args, **kwargs)


def refuse_plain_save(model: nn.Module, plan: Mapping) -> bool:
    """After a structural plan was applied to a Hugging Face model: guard ``model.save_pretrained`` so that
    it raises :class:`~secateur.io.pretrained.UnloadableConfigError` whenever plain ``from_pretrained`` of
    its ``config.json`` would not rebuild the model (:class:`PlainSaveRefusal`; the check runs when
    ``save_pretrained`` is called, so pruning pays nothing for it). Models that are not Hugging Face models
    are left alone; a guard left by an earlier pruning is replaced (it checks against the latest ``plan``).

    The guard is an instance attribute shadowing the class's method (nothing in ``transformers`` is
    patched); :func:`secateur.save_pretrained` calls the class's method and writes the plan beside the
    weights, so it (and :func:`secateur.save`) still save the model. Returns True when a guard is installed.
    """
    if not is_hf_model(model):
        return False
    model.__dict__["save_pretrained"] = PlainSaveRefusal(model, plan)
    return True


def plain_save_problems(model: nn.Module) -> list[str]:
    """Why the model's own ``save_pretrained`` would refuse (one sentence per config field at fault), ``[]``
    when it would save: no guard installed (:func:`refuse_plain_save`) or a config that describes the
    model. Costs one meta-device build when a guard is installed."""
    guard = model.__dict__.get("save_pretrained")
    return guard.problems() if isinstance(guard, PlainSaveRefusal) else []
