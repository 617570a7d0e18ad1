"""secateur: neural network pruning for PyTorch.

Pruning is composed from small pieces (see docs/architecture.md): a *scope* (which parameters),
a *criterion* (how important each unit is), an *allocation* (how much to remove where), a
*schedule* (when), and an *applier* (masks, then physical compaction).

The library reports through :mod:`logging` (one logger per module, under ``"secateur"``) and never
prints; the ``secateur`` command line chooses what to show. In your own script,
``logging.basicConfig(level=logging.INFO)`` shows secateur's progress messages.
"""

import importlib as _importlib
import logging as _logging
from typing import TYPE_CHECKING

from secateur.errors import (
    ChecksumError,
    CompactionError,
    ConfigError,
    DataError,
    GraphError,
    ScopeError,
    SecateurError,
    SerializationError,
    UnsupportedOpError,
)

if TYPE_CHECKING:  # for type checkers and documentation tools; at run time they load on first use
    from secateur.analysis import count_macs, count_params, layer_table
    from secateur.analysis.latency import measure
    from secateur.compact import check_equivalence
    from secateur.graph import DependencyGraph
    from secateur.io import from_pretrained, load, save, save_pretrained
    from secateur.methods.group_sparsity import GroupSparsityPenalty, GrowingRegularization
    from secateur.pruners.channel import ChannelPruner
    from secateur.pruners.element import Pruner
    from secateur.pruners.heads import prune_heads
    from secateur.pruners.oneshot import prune_channels
    from secateur.pruners.recipe import Recipe
    from secateur.schedules import Cubic, Iterative, OneShot
    from secateur.scope import Scope

# name -> module: imported on first access (PEP 562), so that `import secateur` and `secateur --help` do
# not pay for torch until something needs it
_LAZY = {
    "count_macs": "secateur.analysis",
    "count_params": "secateur.analysis",
    "layer_table": "secateur.analysis",
    "measure": "secateur.analysis.latency",
    "check_equivalence": "secateur.compact",
    "DependencyGraph": "secateur.graph",
    "from_pretrained": "secateur.io",
    "load": "secateur.io",
    "save": "secateur.io",
    "save_pretrained": "secateur.io",
    "GroupSparsityPenalty": "secateur.methods.group_sparsity",
    "GrowingRegularization": "secateur.methods.group_sparsity",
    "ChannelPruner": "secateur.pruners.channel",
    "Pruner": "secateur.pruners.element",
    "prune_heads": "secateur.pruners.heads",
    "prune_channels": "secateur.pruners.oneshot",
    "Recipe": "secateur.pruners.recipe",
    "Cubic": "secateur.schedules",
    "Iterative": "secateur.schedules",
    "OneShot": "secateur.schedules",
    "Scope": "secateur.scope",
}


# subpackages and modules reachable as attributes (``secateur.io.save``) without importing them first
_SUBMODULES = frozenset(
    "allocation analysis app compact criteria data errors graph integrations io llm masks methods pruners "
    "registry schedules scope train zoo".split()
)


def __getattr__(name: str) -> object:
    """The public names of :data:`_LAZY`, imported from their module on first access; subpackages
    (``secateur.io``) are imported when first reached as attributes."""
    if name in _SUBMODULES:
        return _importlib.import_module(f"secateur.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'secateur' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """Module attributes, the lazily imported names included."""
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

# a library leaves handlers to the application (logging HOWTO, "Configuring Logging for a Library")
_logging.getLogger(__name__).addHandler(_logging.NullHandler())

__all__ = [
    "ChannelPruner",
    "ChecksumError",
    "CompactionError",
    "DependencyGraph",
    "Cubic",
    "GroupSparsityPenalty",
    "GrowingRegularization",
    "Iterative",
    "OneShot",
    "Pruner",
    "Recipe",
    "Scope",
    "count_macs",
    "count_params",
    "from_pretrained",
    "layer_table",
    "load",
    "measure",
    "prune_channels",
    "prune_heads",
    "save",
    "save_pretrained",
    "ConfigError",
    "DataError",
    "GraphError",
    "ScopeError",
    "SecateurError",
    "SerializationError",
    "UnsupportedOpError",
    "__version__",
    "check_equivalence",
]
