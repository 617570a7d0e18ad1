"""Compaction in mid-training: fresh Parameters, the optimizer follows, state sliced consistently."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateur.compact import make_plan
from secateur.errors import CompactionError
from secateur.graph.groups import DependencyGraph
from secateur.train import compact_in_training

sys.path.insert(0, str(Path(__file__).parent / "methods"))
from tiny_nets import conv_bn_net  # noqa: E402

X = torch.randn(8, 1, 6, 6)
Y = torch.randint(0, 3, (8,))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return conv_bn_net(5, conv2_bias=True)


def _train(model, opt, steps):
    loss = None
    for _ in range(steps):
        loss = F.cross_entropy(model(X), Y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss  # kept alive by the caller: its graph holds the old gradient accumulators


def _plan_removing(model, units):
    graph = DependencyGraph.build(model, X[:1])
    gi = next(i for i, g in enumerate(graph.groups) if g.n_units == 6 and g.n_prunable)
    return make_plan(graph, {gi: units})


def _opt_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_compaction_mid_training_keeps_optimizer_state_at_kept_indices(kind):
    model = _net()
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    live_loss = _train(model, opt, 3)
    names = dict(model.named_parameters())
    before = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in names.items()}
    old_ids = {n: id(p) for n, p in names.items()}
    plan = _plan_removing(model, [1, 4])
    kept = torch.tensor([0, 2, 3, 5])  # the six channels of the first conv minus units 1 and 4
    dims = {"0.weight": 0, "1.weight": 0, "1.bias": 0, "3.weight": 1}
    renewed = compact_in_training(model, plan, opt)
    assert set(renewed) == set(dims)
    # the optimizer holds exactly the model's parameters, in the same order
    assert [id(p) for p in _opt_params(opt)] == [id(p) for p in model.parameters()]
    for n, p in model.named_parameters():
        st = opt.state[p]
        if n in dims:
            assert id(p) != old_ids[n]
            for key, old in before[n].items():
                if old.dim() == 0:  # Adam's step count is carried over
                    assert torch.equal(st[key], old)
                else:
                    assert torch.equal(st[key], old.index_select(dims[n], kept)), (n, key)
                    assert st[key].shape == p.shape
        else:
            assert id(p) == old_ids[n]
            for key, old in before[n].items():
                assert torch.equal(st[key], old), (n, key)
    # training continues although the previous step's graph is alive
    assert live_loss.grad_fn is not None
    last = _train(model, opt, 3)
    assert torch.isfinite(last)
    assert model[0].out_channels == 4 and model(X).shape == (8, 3)


def test_sgd_step_after_compaction_uses_the_sliced_momentum():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _train(model, opt, 2)
    buf = opt.state[model[0].weight]["momentum_buffer"].clone()
    compact_in_training(model, _plan_removing(model, [0]), opt)
    w = model[0].weight
    w0 = w.detach().clone()
    loss = F.cross_entropy(model(X), Y)
    opt.zero_grad()
    loss.backward()
    g = w.grad.clone()
    opt.step()
    # torch's SGD: b <- μ b + g ; w <- w - lr b, with b the old buffer at the kept filters 1..5
    torch.testing.assert_close(w.detach(), w0 - 0.05 * (0.9 * buf[1:] + g))


def test_failed_compaction_changes_neither_model_nor_optimizer():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _train(model, opt, 1)
    params = list(model.parameters())
    state = {id(p): opt.state[p]["momentum_buffer"].clone() for p in params}
    bad = {"version": 1, "tensors": {"nope.weight": {"0": [0]}}, "groups": [], "attributes": {}, "config": {}}
    with pytest.raises(CompactionError, match="nope.weight"):
        compact_in_training(model, bad, opt)
    assert [id(p) for p in _opt_params(opt)] == [id(p) for p in params] == [id(p) for p in model.parameters()]
    for p in params:
        assert torch.equal(opt.state[p]["momentum_buffer"], state[id(p)])
