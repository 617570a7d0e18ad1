"""Exception types raised by secateur.

Every error names the thing at fault (layer, parameter, file, field) so a user can act on it.
All derive from :class:`SecateurError`; the ones caused by bad arguments also derive from
``ValueError`` so generic ``except ValueError`` code keeps working.
"""

from __future__ import annotations


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


class CompactionError(SecateurError):
    """Physical removal failed; the model was restored to its state before the call."""


class SerializationError(SecateurError, ValueError):
    """A saved file or plan that cannot be loaded (pickle, truncated, does not fit the model)."""


class IncompatibleGroupError(GraphError, CompactionError):
    """Removing units of a group breaks the model's own code (e.g. a head width it derives from another
    dimension) or changes its outputs; the message names the group, the op and the module where it failed.
    The model is unchanged."""
