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

import copy
import inspect
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from secateur._files import file_stamps, honour_umask_of_changed
from secateur._validate import check_model
from secateur.errors import SerializationError
from secateur.io.architecture import (
    architecture_builder,
    architecture_of,
    check_before_build,
)
from secateur.io.folder import (
    FORMAT,
    PLAN_FILE,
    VERSION,
    WEIGHTS_FILE,
    apply_plan,
    plan_text,
    read_safetensors,
    refuse_pickles_in,
    weights_path,
)
from secateur.io.validate import folder_file, read_json, safetensors_shapes, validate_plan

LAYOUT = "huggingface"
INDEX_FILE = "model.safetensors.index.json"

__all__ = [
    "UnloadableConfigError",
    "read_pretrained",
    "save_pretrained",
    "transformers_load_problems",
    "transformers_loadable",
]


class UnloadableConfigError(SerializationError):
    """``save_pretrained`` of a pruned Hugging Face model whose ``config.json`` cannot describe it (layers
    pruned to different widths, or a family that derives a pruned width from another field): plain
    ``from_pretrained`` would build other shapes. The message names the config field and how to reach a
    loadable shape; nothing was written. (Also exported as ``secateur.llm.UnloadableConfigError``.)"""


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _shape_diff(a: dict[str, tuple[int, ...]], b: dict[str, tuple[int, ...]]) -> str | None:
    """The first difference between two ``{name: shape}`` maps as text, or None when they are equal."""
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            return f"{k}: {a.get(k, 'absent')} (rebuilt) vs {b.get(k, 'absent')} (model)"
    return None


def _meta_build(model: nn.Module, config: dict[str, Any]) -> nn.Module:
    """``type(model)`` built from the config dict ``config`` on the meta device (no memory, no init cost).

    The classes are the in-memory model's own (this is the save side: no class is looked up by name)."""
    return meta_build(type(model), type(model.config).from_dict(copy.deepcopy(config)))


def meta_build(cls: type, config: Any) -> nn.Module:
    """``cls(config)`` on the meta device with weight initialisation switched off (transformers'
    ``no_init_weights``): the shapes without memory, and without the init functions, which on meta tensors
    run as slow decompositions (a meta ResNet-50 took ~0.25 s of ``uniform_`` alone). ``cls`` is a
    transformers ``PreTrainedModel`` class; raises whatever its constructor raises for ``config``."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    with torch.device("meta"), no_init_weights():
        model = cls(config)
    tie = getattr(model, "tie_weights", None)  # no_init_weights also skips init_weights, which ties them
    if callable(tie):
        with torch.device("meta"):
            tie()
    return model


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
    try:
        ref = _meta_build(model, cfg.to_dict())
    except Exception:  # a config transformers itself rejects (e.g. hidden_size % heads != 0)
        return False
    return _shape_diff(_shapes(ref), _shapes(model)) is None and _attributes_match(ref, plan)


def transformers_load_problems(model: nn.Module, plan: dict | None = None) -> list[str]:
    """Why plain ``transformers`` ``from_pretrained`` would not rebuild the pruned ``model`` from its own
    config, one sentence per config field at fault with how to reach a loadable shape; ``[]`` when
    :func:`transformers_loadable` holds.

    The family knowledge (head size derived as ``hidden / heads``, Bloom's and MPT's MLP of ``4 x hidden``)
    is :func:`secateur.compact.hf_configs.unexpressible_fields`; fields that layers disagree on
    (``_inconsistent_`` keys of the plan) and configs transformers itself rejects are named too; otherwise
    the first tensor whose shape differs.

    Args:
        model: a Hugging Face ``PreTrainedModel`` after the plan was applied.
        plan: the plan applied to it (its ``"config"`` section names the fields); optional.
    """
    if transformers_loadable(model, plan):
        return []
    from secateur.compact.hf_configs import unexpressible_fields

    out: list[str] = []
    cfg = model.config
    shapes = _shapes(model)
    planned_config = dict((plan or {}).get("config") or {})
    planned_config.setdefault("", {})  # a family may lack a field for what was pruned: no change recorded
    for ck, changes in planned_config.items():
        sub = cfg if ck == "" else getattr(cfg, ck, None)
        if sub is None:
            continue
        for k, (_old, new) in changes.items():
            if k.startswith("_inconsistent_"):
                out.append(
                    f"{k.removeprefix('_inconsistent_')}: the layers now have "
                    f"{' or '.join(map(str, new))}, a config holds one value for every layer; prune every "
                    "layer alike (uniform per-layer ratios, e.g. secateur.llm.prune_decoder(..., "
                    "uniform=True), round_to=...)"
                )
        dense = {k: old for k, (old, _new) in changes.items() if not k.startswith("_inconsistent_")}
        before = copy.copy(sub)
        for k, old in dense.items():
            try:
                setattr(before, k, old)
            except (AttributeError, TypeError):
                pass
        planned = {k: v for k, v in changes.items() if not k.startswith("_inconsistent_")}
        out += unexpressible_fields(getattr(sub, "model_type", None), before, planned, shapes)
    if not out:
        try:
            ref = _meta_build(model, cfg.to_dict())
        except Exception as e:  # transformers rejects the config itself (e.g. hidden_size % heads != 0)
            return [
                f"transformers rejects the pruned config: {e}; keep widths multiples of the head count "
                "(round_to=...) or leave the heads whole"
            ]
        diff = _shape_diff(_shapes(ref), shapes)
        out.append(f"config.json builds other shapes ({diff or 'head attributes differ'})")
    return out


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike[str],
    plan: dict | None = None,
    *,
    metadata: dict | None = None,
    require_loadable: bool = False,
    **save_kwargs: Any,
) -> Path:
    """Save a (pruned) Hugging Face model in the Hugging Face layout plus secateur's ``plan.json``.

    Writes what ``model.save_pretrained(directory, **save_kwargs)`` writes (``config.json``, safetensors
    weights, possibly sharded with ``max_shard_size``), then ``plan.json`` (written last, atomically).
    Reload with :func:`from_pretrained` (or :func:`secateur.load`); see the module docstring for what
    plain ``transformers`` does with the folder.

    Args:
        model: a ``transformers.PreTrainedModel``, compacted by ``plan`` (or unpruned with ``plan=None``).
            Element masks must be baked first (``Pruner.finalize()``); the model is not changed.
        directory: the output folder (created if missing).
        plan: the structural plan applied to the model (``prune_channels`` returns it,
            ``ChannelPruner.plan`` after ``finalize()``).
        metadata: extra JSON-able data stored in plan.json.
        require_loadable: raise :class:`UnloadableConfigError` (naming the config fields,
            :func:`transformers_load_problems`) instead of writing a folder that plain ``transformers``
            cannot load (``secateur.from_pretrained`` always can).
        save_kwargs: passed to ``model.save_pretrained`` (e.g. ``max_shard_size="200MB"``).

    Returns the folder path.

    Raises:
        SerializationError: ``model`` is not a Hugging Face model; it still carries masks (names the
            module); the plan does not turn the original architecture into ``model``'s shapes (names the
            first differing tensor, also when a compacted model comes without its plan); metadata is not
            JSON-serialisable. Nothing is written then.
        UnloadableConfigError: ``require_loadable=True`` and plain transformers could not load the folder.
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
                "(Pruner.finalize() / ChannelPruner.finalize()), or use secateur.save, which keeps masks"
            )
    check_model(model)
    if plan is not None:
        validate_plan(plan, "plan")  # a plan from_pretrained would refuse is refused before writing
    arch = architecture_of(model, plan)
    ref = _meta_build(model, arch["config"])
    apply_plan(ref, plan, f"the plan does not fit {type(model).__name__}'s original config")
    diff = _shape_diff(_shapes(ref), _shapes(model))
    if diff is not None:
        hint = " (a compacted model needs its plan: pass plan=...)" if not plan else ""
        raise SerializationError(
            f"the plan applied to the original {type(model).__name__} does not give this model's shapes: "
            f"{diff}{hint}"
        )
    loadable = transformers_loadable(model, plan)
    if require_loadable and not loadable:
        raise UnloadableConfigError(
            f"{type(model).__name__}'s config.json cannot describe the pruned model, so plain transformers "
            f"from_pretrained would fail: {'; '.join(transformers_load_problems(model, plan))}. Nothing was "
            "written; secateur.save_pretrained without require_loadable writes a folder "
            "secateur.from_pretrained rebuilds"
        )
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
    text = plan_text(doc)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # the class's method: prune_decoder shadows a model's own save_pretrained with a refusal when config.json
    # alone cannot describe it (secateur.llm.loadable); this writer adds plan.json, which does
    hf_save = type(model).save_pretrained
    if "save_original_format" in inspect.signature(hf_save).parameters:
        # transformers 5 would rename fused tensors back to a legacy layout (MoE experts as one tensor per
        # expert) that from_pretrained cannot read without transformers' own converters; the model's own
        # names load in both (transformers' loader passes them through unchanged)
        save_kwargs.setdefault("save_original_format", False)
    before = file_stamps(directory)
    try:
        hf_save(model, directory, **save_kwargs)
    except Exception as e:  # transformers validates the config (e.g. hidden size vs head count) on save
        raise SerializationError(
            f"transformers refused to save {type(model).__name__} into {directory}: {e}. A pruned width "
            "its config must divide (hidden_size by num_attention_heads) can be kept a multiple with "
            "round_to=..., or save with secateur.save, which rebuilds from the original config"
        ) from e
    honour_umask_of_changed(directory, before)  # transformers' safetensors files come out 0600
    tmp = directory / (PLAN_FILE + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, directory / PLAN_FILE)
    return directory


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a Hugging Face checkpoint folder (single file, or the shards its index lists),
    each confined to the folder, regular, present and not a pickle."""
    single = folder_file(directory, WEIGHTS_FILE, "the folder")
    if single.exists():
        return [weights_path(directory, WEIGHTS_FILE, "the folder")]
    index = folder_file(directory, INDEX_FILE, "the folder")
    if not index.exists():
        refuse_pickles_in(directory, (".bin", ".pt"))
        raise SerializationError(f"{directory}: no {WEIGHTS_FILE} nor {INDEX_FILE}")
    doc = read_json(index, "safetensors index", max_bytes=1 << 28)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SerializationError(f"{index}: not a safetensors index (no 'weight_map' object)")
    names = set()
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise SerializationError(f"{index}: weight_map[{tensor!r}] is not a file name: {shard!r}")
        names.add(shard)
    missing = f"missing (listed in {INDEX_FILE})"
    return [weights_path(directory, n, f"{INDEX_FILE} (weight_map)", missing) for n in sorted(names)]


def _header_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """``{tensor: shape}`` over all files' headers; a tensor stored in two files is refused."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        for k, shape in safetensors_shapes(f).items():
            if k in shapes:
                raise SerializationError(f"{f}: tensor {k!r} is also stored in another shard")
            shapes[k] = shape
    return shapes


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


def read_pretrained(
    directory: Path,
    doc: dict[str, Any],
    *,
    factory: str | Callable[..., nn.Module] | None = None,
    trust_factory: str | Iterable[str] | None = (),
) -> nn.Module:
    """Rebuild the model of a folder in the Hugging Face layout (``doc``: its validated plan.json) whose
    files :func:`~secateur.io.folder.open_folder` checked; in eval mode. See :func:`secateur.from_pretrained`
    for the steps, the trust options and the errors."""
    source = str(directory / PLAN_FILE)
    arch, plan = doc["architecture"], doc.get("plan")
    if arch.get("kind") != "huggingface":
        raise SerializationError(f"{source}: architecture kind {arch.get('kind')!r}, expected huggingface")
    files = _weight_files(directory)
    shapes = _header_shapes(files)
    build, meta_ok = architecture_builder(arch, source, factory=factory, trust_factory=trust_factory)
    check_before_build(build, meta_ok, arch, plan, shapes, source, str(directory), allow_missing=True)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(read_safetensors(f))
    model = build()
    apply_plan(model, plan, f"{source}: the plan does not fit the model")
    _load_weights(model, tensors, directory)
    return model.eval()
