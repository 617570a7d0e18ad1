"""Save and load pruned models without pickle.

A saved model is a folder with two files:

- ``plan.json``: how to rebuild the architecture (a zoo record, a Hugging Face config and class, or
  a user factory ``"module:function"`` with JSON keyword arguments), the structural pruning plan
  (kept indices per tensor, see :func:`secateur.compact.make_plan`) and the names of element masks;
- ``model.safetensors``: the weights as the model computes with them (masks applied), plus each
  element mask as a bool tensor under ``"__mask__/<module>.<param>"``. A tied tensor (``lm_head.weight``
  *is* ``transformer.wte.weight``) is written once, under its first name; plan.json's ``"tied"`` records
  ``{alias: stored name}`` (absent in folders written before, which store both names and still load).

Loading rebuilds the *original* architecture, re-applies the plan with the same transactional
compaction that pruned it, loads the weights strictly and re-attaches masks, so outputs are
reproduced exactly. Nothing is ever unpickled: a pickle file is refused with an error naming it.

A folder is data, never code: loading runs no code the folder names. Zoo and Hugging Face
architectures are rebuilt from secateur's zoo and transformers' own classes; a user factory only
when the caller passes it or allows its name (:func:`load`). The folder is validated before anything
is built (:mod:`secateur.io.validate`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from secateur._files import honour_umask
from secateur._validate import check_model
from secateur.errors import (
    ConfigError,
    SerializationError,
)
from secateur.io.architecture import (
    architecture_builder,
    architecture_of,
    check_before_build,
)
from secateur.io.folder import (
    FORMAT,
    MASK_PREFIX,
    PLAN_FILE,
    VERSION,
    WEIGHTS_FILE,
    apply_plan,
    plan_text,
    read_safetensors,
    weights_path,
)
from secateur.io.tied import check_tied_file, tied_aliases
from secateur.io.validate import (
    safetensors_shapes,
    validate_plan,
)
from secateur.masks import set_mask
from secateur.masks.element import element_mask

# ---------------------------------------------------------------------------------------- architecture

# ---------------------------------------------------------------------------------------------- tensors
def _weights_and_masks(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Plain-named effective tensors (masks applied) and the names of masked parameters."""
    out: dict[str, torch.Tensor] = {}
    masks: list[str] = []
    for name, t in model.state_dict().items():
        if ".parametrizations." in name or name.startswith("parametrizations."):
            continue
        out[name] = t
    for path, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for pname in module.parametrizations.keys():
            full = f"{path}.{pname}" if path else pname
            out[full] = getattr(module, pname).detach()
            m = element_mask(module, pname)
            if m is not None:
                out[MASK_PREFIX + full] = m.mask
                masks.append(full)
    return out, masks


def _stored_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """What ``save`` writes: each storage once (tied aliases dropped), the masked names and the aliases.

    A tied weight (``lm_head.weight`` is ``transformer.wte.weight``) appears under both names in the state
    dict, sharing storage: it is written under its first name and recorded as ``{alias: first}``. A masked
    weight's effective tensor is computed afresh, so it never aliases anything: a tied weight masked under
    one name (or both) is stored under each name, as before. Element masks are always stored.
    """
    tensors, masks = _weights_and_masks(model)
    tied = tied_aliases(tensors, skip_prefix=MASK_PREFIX)
    # safetensors needs contiguous tensors that share no memory: one CPU copy per stored name.
    kept = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items() if k not in tied}
    return kept, masks, tied


def save(
    model: nn.Module,
    directory: str | os.PathLike[str],
    plan: dict | None = None,
    *,
    factory: str | None = None,
    factory_kwargs: dict | None = None,
    metadata: dict | None = None,
) -> Path:
    """Save ``model`` (pruned or not) to ``directory`` as ``plan.json`` + ``model.safetensors``.

    Args:
        model: the model, possibly compacted by ``plan`` and possibly carrying element masks.
        plan: the structural pruning plan that was applied to it (from ``prune_channels`` or a
            structured pruner); ``None`` if it was not compacted.
        factory, factory_kwargs: how to build the unpruned model when it is neither a zoo nor a
            Hugging Face model.
        metadata: extra JSON-able data stored in plan.json (e.g. accuracy, recipe).

    Returns the folder path. A tensor tied under several names (the same storage, offset, shape and stride,
    e.g. ``lm_head.weight`` *is* ``transformer.wte.weight``) is written once, under its first state-dict name,
    and plan.json's ``"tied"`` records ``{alias: stored name}`` (:mod:`secateur.io.tied`); a masked tied
    weight is computed afresh, so it is stored under each name as before.

    Raises:
        InvalidModelError: ``model`` is not an ``nn.Module`` or has tensors on the meta device.
        SerializationError: the architecture cannot be recorded, ``plan`` is malformed (as
            :func:`secateur.io.validate.validate_plan` says) or metadata is not JSON-serialisable.

    Loading a model built by a user factory needs the caller to trust that factory: see :func:`load`.
    """
    check_model(model)
    directory = Path(directory)
    if plan is not None:
        validate_plan(plan, "plan")  # a plan load() would refuse is refused now, before anything is written
    arch = architecture_of(model, plan, factory, factory_kwargs)
    tensors, masks, tied = _stored_tensors(model)
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": arch,
        "plan": plan,
        "masks": masks,
        "metadata": metadata or {},
    }
    if tied:
        doc["tied"] = tied
    text = plan_text(doc)
    directory.mkdir(parents=True, exist_ok=True)
    tmp_w, tmp_p = directory / (WEIGHTS_FILE + ".tmp"), directory / (PLAN_FILE + ".tmp")
    save_file(tensors, str(tmp_w), metadata={"format": FORMAT})
    honour_umask(tmp_w)  # safetensors creates its file 0600 whatever the umask
    tmp_p.write_text(text)
    os.replace(tmp_w, directory / WEIGHTS_FILE)
    os.replace(tmp_p, directory / PLAN_FILE)
    return directory


def _alias_values(
    model: nn.Module, tied: dict[str, str], weights: dict[str, torch.Tensor], source: str, wpath: Path
) -> dict[str, torch.Tensor]:
    """``{alias: its stored tensor}`` for each alias plan.json records (checked against the file already).

    An alias the rebuilt ``model`` ties to its target (the same ``Parameter``) needs nothing more; one it
    does not tie gets the target's values (a copy, by ``load_state_dict``) so no tensor stays at its random
    initialisation.

    Raises:
        SerializationError: an alias or target that is no tensor of the model (naming plan.json and
            ``tied[alias]``), or an untied alias whose shape differs from the stored tensor's (naming the
            weights file and the key).
    """
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    out: dict[str, torch.Tensor] = {}
    for alias, target in tied.items():
        for name in (alias, target):
            if name not in named:
                raise SerializationError(
                    f"{source}: tied[{alias!r}]: the rebuilt model has no tensor {name!r}"
                )
        tied_in_model = named[alias] is named[target]
        if not tied_in_model and tuple(named[alias].shape) != tuple(weights[target].shape):
            raise SerializationError(
                f"{wpath}: {alias!r} is recorded as an alias of {target!r} ({tuple(weights[target].shape)}) "
                f"but the rebuilt model does not tie them and its {alias!r} is {tuple(named[alias].shape)}"
            )
        out[alias] = weights[target]
    return out


def _retie(
    model: nn.Module, weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], wpath: Path
) -> None:
    """Make the values of every pair of names the rebuilt ``model`` ties (one tensor) agree, in ``weights``.

    A tied weight masked under one name only is stored under both (the masked name holds ``raw * mask``,
    the other the raw tensor, which may differ at masked positions, e.g. an embedding trained under a
    masked LM head): the raw values are loaded under both names (the mask is attached again after). Any
    other pair must hold equal values: loading would keep whichever name comes last and silently drop the
    other (a model saved untied, rebuilt by a factory or config that ties).

    Raises:
        SerializationError: two different tensors under names the rebuilt model ties, naming the weights
            file and both names.
    """
    for alias, target in tied_aliases(model.state_dict()).items():
        a, t = weights.get(alias), weights.get(target)
        if a is None or t is None or a is t:
            continue
        if a.shape == t.shape and a.dtype == t.dtype:
            if torch.equal(a, t):
                continue
            if (alias in masks) != (target in masks):
                masked, raw = (alias, target) if alias in masks else (target, alias)
                if torch.equal(weights[masked], weights[raw] * masks[masked]):
                    weights[masked] = weights[raw]
                    continue
        raise SerializationError(
            f"{wpath}: the rebuilt model ties {alias!r} to {target!r} (one tensor) but the file stores "
            "different values under the two names; rebuild with a factory or config that does not tie them"
        )


def read_saved(
    directory: Path,
    doc: dict[str, Any],
    *,
    factory: str | Callable[..., nn.Module] | None = None,
    trust_factory: str | Iterable[str] | None = (),
) -> nn.Module:
    """Rebuild the model of a folder in secateur's own layout (``doc``: its validated plan.json) whose
    files :func:`~secateur.io.folder.open_folder` checked. See :func:`secateur.load` for the steps, the
    trust options and the errors."""
    source = str(directory / PLAN_FILE)
    wpath = weights_path(directory, WEIGHTS_FILE, "the folder")
    shapes = safetensors_shapes(wpath)
    arch, plan = doc["architecture"], doc.get("plan")
    build, meta_ok = architecture_builder(arch, source, factory=factory, trust_factory=trust_factory)
    plain = {k: v for k, v in shapes.items() if not k.startswith(MASK_PREFIX)}
    masks = {k[len(MASK_PREFIX) :]: v for k, v in shapes.items() if k.startswith(MASK_PREFIX)}
    if set(masks) != set(doc.get("masks", [])):
        raise SerializationError(f"{wpath}: masks {sorted(masks)} differ from those listed in plan.json")
    for full, shape in masks.items():
        if plain.get(full) != shape:
            raise SerializationError(
                f"{wpath}: mask for {full!r} has shape {shape}, its weight {plain.get(full, 'is absent')}"
            )
    tied = doc.get("tied") or {}
    check_tied_file(tied, plain, source)
    check_before_build(build, meta_ok, arch, plan, plain, source, str(wpath), allow_missing=bool(tied))
    tensors = read_safetensors(wpath)
    model = build()
    apply_plan(model, plan, f"{source}: the plan does not fit the model")
    weights = {k: v for k, v in tensors.items() if not k.startswith(MASK_PREFIX)}
    weights.update(_alias_values(model, tied, weights, source, wpath))
    _retie(model, weights, {k: tensors[MASK_PREFIX + k] for k in masks}, wpath)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise SerializationError(f"{wpath}: weights do not fit the rebuilt model: {e}") from e
    for full in masks:
        path, _, pname = full.rpartition(".")
        try:
            module = model.get_submodule(path)
        except AttributeError as e:
            raise SerializationError(f"{wpath}: mask for {full!r} names no module") from e
        try:
            set_mask(module, tensors[MASK_PREFIX + full], pname)
        except ConfigError as e:
            raise SerializationError(f"{wpath}: mask for {full!r}: {e}") from e
    return model
