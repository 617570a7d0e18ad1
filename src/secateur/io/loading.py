"""The two public readers, :func:`load` and :func:`from_pretrained`: each reads either layout.

:func:`load` returns the model as secateur saved it (training mode, torch's default);
:func:`from_pretrained` in eval mode, as transformers' ``from_pretrained`` does. Both open and check the
folder once (:func:`~secateur.io.folder.open_folder`) and hand it to the reader of its layout.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from torch import nn

from secateur.io.folder import open_folder
from secateur.io.pretrained import LAYOUT, read_pretrained
from secateur.io.serialization import read_saved

__all__ = ["from_pretrained", "load"]


def load(
    directory: str | os.PathLike[str],
    *,
    factory: str | Callable[..., nn.Module] | None = None,
    trust_factory: str | Iterable[str] | None = (),
) -> nn.Module:
    """Rebuild a model saved by :func:`save`: architecture, then the plan, then weights and masks.

    A saved folder is data: it never makes secateur run code it names. Zoo and Hugging Face architectures are
    rebuilt from secateur's zoo and transformers' own classes (a config's ``auto_map`` is ignored, no remote
    code). A model built by a user factory (``save(..., factory="mypkg.models:build")``) is rebuilt only when
    the caller vouches for the code, in one of two ways:

    - ``load(path, factory=build)`` (the function) or ``load(path, factory="mypkg.models:build")`` (a name the
      caller gives): the caller's factory builds the architecture, called with the recorded keyword arguments
      (it also overrides a zoo or Hugging Face record);
    - ``load(path, trust_factory=["mypkg.models:build"])``: the recorded factory is imported and called only
      if its name is in the list (one string counts as a one-name list).

    Before anything is built, the folder is validated (:mod:`secateur.io.validate`): files confined to the
    folder and regular, plan.json depth-limited and well-formed (kept indices unique, sorted, in range),
    architecture sizes bounded by the weights present, the architecture with its plan built on the meta
    device and compared with the safetensors header shapes.

    Args:
        directory: the folder holding plan.json and model.safetensors.
        factory: a callable or ``"package.module:function"`` building the unpruned architecture.
        trust_factory: factory names (``"package.module:function"``) the recorded factory may be.

    Returns the model with the plan applied, weights and element masks loaded.

    Raises:
        UntrustedCodeError: the folder's architecture is a factory the caller did not pass nor trust (nothing
            was imported or called); the message names both options.
        UnsafePathError: a file that resolves outside the folder or is not a regular file (FIFO, device).
        SerializationError: a missing, truncated or pickle file, a malformed or too deep plan, indices
            duplicated / unsorted / out of range, sizes the weights do not back, or weights that do not fit
            the rebuilt model; the message names the file and the field.
        ConfigError: ``factory`` or ``trust_factory`` of the wrong form.
    """
    directory, doc = open_folder(directory, "secateur.save")
    if doc.get("layout") == LAYOUT:  # written by secateur.save_pretrained
        return read_pretrained(directory, doc, factory=factory, trust_factory=trust_factory)
    return read_saved(directory, doc, factory=factory, trust_factory=trust_factory)


def from_pretrained(
    directory: str | os.PathLike[str],
    *,
    factory: str | Callable[..., nn.Module] | None = None,
    trust_factory: str | Iterable[str] | None = (),
) -> nn.Module:
    """Rebuild a model written by :func:`save_pretrained` (a folder of :func:`secateur.save` works too, via
    :func:`secateur.load`, which receives ``factory`` and ``trust_factory``).

    Steps: read and validate ``plan.json`` (:mod:`secateur.io.validate`); read the safetensors headers (the
    single file, or the shards ``model.safetensors.index.json`` lists, each confined to the folder, a regular
    file); build the original class among transformers' own classes from the original config (``auto_map``
    ignored, no remote code; a class outside transformers only with ``trust_factory`` naming it) on the meta
    device, check the plan against it and compare shapes with the headers; then build it for real, apply the
    plan (:func:`secateur.compact.compact`), cast to the checkpoint's dtype and load the weights (tied aliases
    may be absent, nothing else). Returns the model in eval mode, as transformers' ``from_pretrained`` does.

    Args:
        directory: the folder.
        factory, trust_factory: as in :func:`secateur.load` (a factory the caller passes overrides the
            recorded class; it is called with no arguments here).

    Raises:
        UntrustedCodeError: a recorded factory or class outside transformers the caller did not trust.
        UnsafePathError: a weight file (e.g. a ``weight_map`` entry ``../x.safetensors`` or an absolute path)
            outside the folder, a symlink leaving it, or a file that is not regular (FIFO).
        SerializationError: missing/truncated/pickle files, a malformed plan, sizes the weights do not back, a
            plan that does not fit the rebuilt model, or weights whose names or shapes do not fit; the message
            names the file at fault.
    """
    directory, doc = open_folder(directory, "secateur.save_pretrained")
    if doc.get("layout") != LAYOUT:
        return read_saved(directory, doc, factory=factory, trust_factory=trust_factory).eval()
    return read_pretrained(directory, doc, factory=factory, trust_factory=trust_factory)
