"""secateur: neural network pruning for PyTorch.

Pruning is composed from small pieces (see docs/architecture.md): a *scope* (which parameters),
a *criterion* (how important each unit is), an *allocation* (how much to remove where), a
*schedule* (when), and an *applier* (masks, then physical compaction).

The library reports through :mod:`logging` (one logger per module, under ``"secateur"``) and never
prints; the ``secateur`` command line chooses what to show. In your own script,
``logging.basicConfig(level=logging.INFO)`` shows secateur's progress messages.
"""

import logging as _logging

from secateur.analysis import count_macs, count_params, layer_table
from secateur.analysis.latency import measure
from secateur.compact import check_equivalence
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
