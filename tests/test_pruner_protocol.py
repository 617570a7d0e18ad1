"""Both drivers answer the same verbs (step, sparsity, finalize, state_dict) and callbacks drive either."""

import math

import torch

from secateur.integrations._stepping import PrunerStepping
from secateur.pruners.base import PrunerBase
from secateur.pruners.channel import ChannelPruner
from secateur.pruners.element import Pruner
from secateur.schedules import Iterative
from secateur.zoo import create_model

X = torch.randn(2, 1, 28, 28)


def _pruners():
    torch.manual_seed(0)
    yield Pruner(create_model("lenet5"), Iterative(0.5, steps=2, every=1))
    torch.manual_seed(0)
    yield ChannelPruner(create_model("resnet8"), X, schedule=Iterative(0.5, steps=2, every=1))


def test_both_pruners_share_the_protocol_and_reach_their_sparsity():
    for pruner in _pruners():
        assert isinstance(pruner, PrunerBase)
        stepping = PrunerStepping(pruner, sync=False)
        for step in range(0, 4):
            stepping._step(step)
        # every mask change was recorded with a real sparsity (a ChannelPruner recorded NaN before)
        assert [s for s, _ in stepping.updates] == [0, 1]
        assert all(math.isfinite(v) for _, v in stepping.updates)
        assert stepping.updates[-1][1] >= 0.5 - 0.05
        state = pruner.state_dict()
        assert state["last_update"] == 1
        model = pruner.finalize()
        assert isinstance(model, torch.nn.Module)
        assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in model.modules())
