"""The lowest-layer torch helpers (secateur._torch): eval_mode restores every module's own training flag
whatever the block raises; example inputs are called and searched for tensors one by one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateur._torch import ExampleInputs, as_examples, call_model, eval_mode, iter_tensors, op_name
from secateur.errors import ConfigError


def _mixed_modes() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.5)).train()
    model[1].eval()  # a frozen batch norm inside a model in training
    return model


@pytest.mark.parametrize("exc", [None, RuntimeError("boom"), KeyboardInterrupt()])
def test_eval_mode_restores_each_modules_own_flag(exc):
    model = _mixed_modes()
    before = [m.training for m in model.modules()]
    x = torch.randn(2, 3, 5, 5)
    stats = model[1].running_mean.clone()
    try:
        with eval_mode(model) as m:
            assert m is model and not any(mod.training for mod in model.modules())
            model(x)  # in eval: no batch-norm statistics updated
            if exc is not None:
                raise exc
    except (RuntimeError, KeyboardInterrupt) as e:
        assert e is exc
    assert [m.training for m in model.modules()] == before == [True, True, False, True]
    assert torch.equal(model[1].running_mean, stats)


def test_example_inputs_are_called_and_searched_one_by_one():
    model = nn.Linear(3, 2)
    a, b = torch.randn(4, 3), torch.randn(1, 3)
    xs = ExampleInputs([a, (b,), {"input": a[:2]}])
    outs = call_model(model, xs)
    assert isinstance(outs, tuple) and [tuple(o.shape) for o in outs] == [(4, 2), (1, 2), (2, 2)]
    found = list(iter_tensors(xs))  # every input's tensors, in order
    assert len(found) == 3 and found[0] is a and found[1] is b and found[2].data_ptr() == a.data_ptr()
    assert as_examples(a) == (a,) and as_examples(xs) == xs.inputs
    doubled = ExampleInputs([a, b]).map(lambda t: t.double())
    assert [t.dtype for t in iter_tensors(doubled)] == [torch.float64] * 2
    with pytest.raises(ConfigError, match="at least one"):
        ExampleInputs([])
    with pytest.raises(ConfigError, match="nested"):
        ExampleInputs([xs])


def test_op_names_are_bare_names():
    assert op_name(torch.Tensor.__iadd__) == "iadd"
    assert op_name(torch.nn.functional.conv2d) == "conv2d"
    assert op_name(torch.Tensor.add_) == "add"
