"""Methods: compositions of scope, criterion, allocation and schedule that papers name.

A structured method is a group criterion and/or a training hook plus one call of the structured driver
(:class:`~secateur.pruners.channel.ChannelPruner`, :func:`prune_scored`); none owns a tracer, a timer or a
removal loop.

- :class:`~secateur.methods.lottery.LotteryTicket`: iterative magnitude pruning with rewinding
  (Frankle & Carbin 2019; Frankle et al. 2020).
- :func:`~secateur.methods.at_init.prune_at_init`: SNIP, GraSP and SynFlow before training.
- :mod:`~secateur.methods.rethinking`: Scratch-E / Scratch-B budgets (Liu et al. 2019).
- :class:`ADMM` (Zhang et al. 2018), :class:`Movement` (Sanh et al. 2020), network slimming
  (:class:`SlimmingPenalty`, :func:`slim`; Liu et al. 2017), :class:`SCOP` (Tang et al. 2020),
  :class:`FBS` (Gao et al. 2019; any Conv2d→BatchNorm2d pair, :func:`find_conv_bn_pairs`),
  :func:`prune_redundant` (Ayinde & Zurada 2018; the ``"redundant"`` group criterion), :class:`FisherPruner`
  (Theis et al. 2018; Crowley et al. 2018; the ``"fisher"`` group criterion).
- Group-sparse training before removal, for any group criterion: :class:`GroupSparsityPenalty` (DepGraph's
  group-level sparse learning, Fang et al. 2023) and :class:`GrowingRegularization` (GReg, Wang et al. 2021).
"""

from secateur.methods.admm import ADMM
from secateur.methods.at_init import prune_at_init
from secateur.methods.fbs import FBS, find_conv_bn_pairs
from secateur.methods.fisher_prune import FisherPruner
from secateur.methods.group_sparsity import (
    GroupPenalty,
    GroupSparsityPenalty,
    GrowingRegularization,
    unit_norms,
)
from secateur.methods.lottery import LotteryTicket
from secateur.methods.movement import Movement
from secateur.methods.redundant import prune_redundant
from secateur.methods.rethinking import ScratchBudgets, reinitialize, scratch_budgets
from secateur.methods.scop import SCOP, KnockoffVAE, train_knockoff_vae
from secateur.methods.slimming import SlimmingPenalty, prune_scored, slim

__all__ = [
    "ADMM",
    "FBS",
    "FisherPruner",
    "GroupPenalty",
    "GroupSparsityPenalty",
    "GrowingRegularization",
    "KnockoffVAE",
    "LotteryTicket",
    "Movement",
    "SCOP",
    "ScratchBudgets",
    "SlimmingPenalty",
    "find_conv_bn_pairs",
    "prune_at_init",
    "prune_scored",
    "prune_redundant",
    "reinitialize",
    "scratch_budgets",
    "slim",
    "train_knockoff_vae",
    "unit_norms",
]
