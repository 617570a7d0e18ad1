"""Methods: compositions of scope, criterion, allocation and schedule that papers name.

- :class:`~secateur.methods.lottery.LotteryTicket`: iterative magnitude pruning with rewinding
  (Frankle & Carbin 2019; Frankle et al. 2020).
- :func:`~secateur.methods.at_init.prune_at_init`: SNIP, GraSP and SynFlow before training.
- :mod:`~secateur.methods.rethinking`: Scratch-E / Scratch-B budgets (Liu et al. 2019).
"""

from secateur.methods.at_init import prune_at_init
from secateur.methods.lottery import LotteryTicket
from secateur.methods.rethinking import ScratchBudgets, reinitialize, scratch_budgets

__all__ = ["LotteryTicket", "ScratchBudgets", "prune_at_init", "reinitialize", "scratch_budgets"]
