"""Both drivers answer the same verbs (step, sparsity, finalize, state_dict) and callbacks drive either."""

import json
import math

import pytest
import torch

from secateur.errors import ConfigError
from secateur.integrations._stepping import PrunerStepping
from secateur.pruners.base import PrunerBase, check_schedule
from secateur.pruners.channel import ChannelPruner
from secateur.pruners.element import Pruner
from secateur.schedules import Iterative, OneShot
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


class _Recorder(PrunerBase):
    """The smallest pruner: implements only the hook (prune_to) and sparsity."""

    def __init__(self, schedule):
        self.schedule, self.last_update, self.history, self.calls = check_schedule(schedule), None, [], []

    def prune_to(self, sparsity):
        self.calls.append(sparsity)

    def sparsity(self):
        return self.calls[-1] if self.calls else 0.0


def test_step_is_a_template_method_calling_the_one_hook_at_scheduled_steps_only():
    pruner = _Recorder(Iterative(0.6, steps=3, every=2))  # updates at steps 0, 2, 4
    changed = [pruner.step(s) for s in (0, 0, 1, 2, 1, 3, 4, 5)]
    assert changed == [True, False, False, True, False, False, True, False]  # a repeated / past step: no-op
    assert pruner.calls == pytest.approx([0.2, 0.4, 0.6])
    assert [h["step"] for h in pruner.history] == [0, 2, 4]
    assert [h["sparsity"] for h in pruner.history] == pytest.approx([0.2, 0.4, 0.6])
    resumed = _Recorder(Iterative(0.6, steps=3, every=2))
    resumed.load_state_dict(json.loads(json.dumps(pruner.state_dict())))
    assert resumed.last_update == 4 and resumed.history == pruner.history
    assert not resumed.step(4) and resumed.calls == []  # a resumed pruner does not prune step 4 again


def test_both_pruners_check_a_one_shot_schedule_alike():
    for bad, match in (("0.5", r"schedule \(a one-shot sparsity\).*the string '0\.5'"), (1.5, r"\[0, 1\)")):
        with pytest.raises(ConfigError, match=match):
            Pruner(create_model("lenet5"), bad)
        with pytest.raises(ConfigError, match=match):
            ChannelPruner(create_model("resnet8"), X, schedule=bad)
    assert isinstance(check_schedule(0.3), OneShot) and check_schedule(0.3).sparsity == 0.3
