"""Exception types raised by secateur.

Every error names the thing at fault (layer, parameter, file, field) so a user can act on it.
All derive from :class:`SecateurError`; the ones caused by bad arguments also derive from
``ValueError`` so generic ``except ValueError`` code keeps working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SecateurError(Exception):
    """Base class of all secateur errors."""


class ConfigError(SecateurError, ValueError):
    """A bad argument or recipe value (a sparsity outside [0, 1), an unknown name, ...)."""


class ScopeError(ConfigError):
    """A scope (module type, name pattern) that selects nothing or selects something unprunable."""


class DataError(SecateurError, ValueError):
    """A missing, truncated, corrupted or malformed data file; the message names the file."""


class ChecksumError(DataError):
    """A downloaded file whose SHA-256 does not match the expected digest."""


class GraphError(SecateurError):
    """The dependency graph could not be built or used."""


class UnsupportedOpError(GraphError):
    """An op without a coupling rule ran on a path that carries a prunable dimension."""


class UntracedModuleError(GraphError):
    """Modules with parameters that the traced forward pass never reached (a branch taken only on other
    inputs, a training-only head): their channels' couplings are unknown. The message names them and the
    remedies (trace every branch with ``secateur.graph.ExampleInputs``, or ``untraced="freeze"``)."""


class UntracedModuleWarning(UserWarning):
    """``untraced="freeze"`` kept untraced modules whole and froze the channels around them."""


class CompactionError(SecateurError):
    """Physical removal failed; the model was restored to its state before the call."""


class SerializationError(SecateurError, ValueError):
    """A saved file or plan that cannot be loaded (pickle, truncated, does not fit the model)."""


class UntrustedCodeError(SerializationError):
    """A saved folder names code to run (a user factory ``"package.module:function"``) that the caller did
    not pass or allow; nothing was imported or called. Pass the factory to ``load(..., factory=...)`` or
    allow its name with ``load(..., trust_factory=[...])``."""


class UnsafePathError(SerializationError):
    """A file a saved folder lists that is not a regular file inside the folder (a path that resolves
    outside it, an absolute path, a symlink leaving it, a FIFO or device); nothing was read from it."""


class InvalidModelError(ConfigError, TypeError):
    """The model argument is not a usable ``nn.Module``: not a module at all (a string, a path, a class) or
    a module whose parameters are on the meta device (shapes without values). Also a ``TypeError``, which
    these checks raised before."""


class IncompatibleGroupError(GraphError, CompactionError):
    """Removing units of a group breaks the model's own code (e.g. a head width it derives from another
    dimension) or changes its outputs; the message names the group, the op and the module where it failed.
    The model is unchanged."""


def did_you_mean(word: object, choices: Iterable[object]) -> str:
    """A ``" (did you mean 'x'?)"`` suffix naming the choice closest to ``word``, or ``""``.

    Closeness is :func:`difflib.get_close_matches` (Ratcliff/Obershelp similarity >= 0.6), compared
    case-insensitively; the closest choice is named, with any other choice equally close (ties).
    Non-string inputs give ``""``.
    """
    if not isinstance(word, str):
        return ""
    by_lower: dict[str, str] = {}
    for c in choices:
        if isinstance(c, str):
            by_lower.setdefault(c.lower(), c)
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=3, cutoff=0.6)
    if not close:
        return ""
    ratio = [difflib.SequenceMatcher(None, word.lower(), c).ratio() for c in close]
    best = [c for c, r in zip(close, ratio) if r >= ratio[0] - 1e-9]
    return " (did you mean " + " or ".join(repr(by_lower[c]) for c in best) + "?)"
