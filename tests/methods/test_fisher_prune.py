"""Fisher pruning (Theis et al. 2018; Crowley et al. 2018): the signal, one channel at a time, coupling."""

import pytest
import torch
import torch.nn.functional as F
from tiny_nets import conv_bn_net
from torch import nn
from trainer_grads import assert_no_hooks

from secateur.criteria.group.functional import fisher_channel_scores
from secateur.data import TensorLoader
from secateur.errors import ConfigError
from secateur.methods.fisher_prune import FisherPruner
from secateur.train import Trainer
from secateur.zoo import create_model


def _net() -> nn.Module:
    torch.manual_seed(0)
    return conv_bn_net()


class _Res(nn.Module):
    """Two branches summed: both BatchNorms share one channel group (one gate per channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(1, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        self.a1, self.a2 = self.b1(self.c1(x)), self.b2(self.c2(x))
        for a in (self.a1, self.a2):
            if a.requires_grad:
                a.retain_grad()
        return self.fc(F.relu(self.a1 + self.a2).mean((2, 3)))


def test_signal_matches_theis_formula():
    model = _net().eval()
    fp = FisherPruner(model, torch.randn(1, 1, 6, 6))
    acts = {}

    def keep(m, a, o):
        o.retain_grad()
        acts["a"] = o

    model[1].register_forward_hook(keep)
    x, y = torch.randn(5, 1, 6, 6), torch.tensor([0, 1, 2, 0, 1])
    F.cross_entropy(model(x), y).backward()
    s = fp.scores()["0.weight:0"]
    torch.testing.assert_close(s, fisher_channel_scores(acts["a"], acts["a"].grad))


def test_residual_group_sums_gates_per_sample():
    torch.manual_seed(0)
    model = _Res().eval()
    fp = FisherPruner(model, torch.randn(1, 1, 5, 5))
    x, y = torch.randn(6, 1, 5, 5), torch.randint(0, 3, (6,))
    F.cross_entropy(model(x), y).backward()
    ((name, s),) = fp.scores().items()
    dz = (model.a1 * model.a1.grad).sum((2, 3)) + (model.a2 * model.a2.grad).sum((2, 3))
    torch.testing.assert_close(s, dz.double().pow(2).sum(0) / 12)
    model.a1 = model.a2 = None  # the kept activations (graph tensors) cannot be deep-copied for the oracle
    rec = fp.prune_one()
    assert rec["unit"] == int(torch.argmin(s))
    assert model.c1.out_channels == 3 and model.c2.out_channels == 3 and model.fc.in_features == 3
    assert model(x).shape == (6, 3)


def test_one_channel_at_a_time_with_trainer_on_resnet():
    torch.manual_seed(0)
    model = create_model("resnet8")
    x, y = torch.randn(16, 1, 12, 12), torch.randint(0, 10, (16,))
    loader = TensorLoader(x, y, 8, shuffle=True)
    n0 = sum(p.numel() for p in model.parameters())
    fp = FisherPruner(model, x[:2], every=2, total=3)
    trainer = Trainer(model, loader, epochs=4, lr=0.01, callbacks=[fp], progress=False)
    trainer.fit()
    assert len(fp.removed) == 3 and [r["step"] for r in fp.removed] == [2, 4, 6]
    assert sum(p.numel() for p in model.parameters()) < n0
    assert model(x[:2]).shape == (2, 10)
    assert_no_hooks(model)  # on_train_end detached the Fisher hooks
    held = [id(p) for g in trainer.optimizer.param_groups for p in g["params"]]
    assert held == [id(p) for p in model.parameters()]


def test_errors():
    with pytest.raises(ConfigError):
        FisherPruner(_net(), torch.randn(1, 1, 6, 6), every=0)
    fp = FisherPruner(_net(), torch.randn(1, 1, 6, 6))
    with pytest.raises(ConfigError, match="no Fisher signal"):
        fp.prune_one()


def test_prune_between_steps_with_live_graph_and_optimizer():
    """A loop keeps its last loss (and graph) alive while pruning; the next backward must work."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    fp = FisherPruner(model, torch.randn(1, 1, 6, 6))
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    for _ in range(4):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        fp.update()
        fp.prune_one(opt)
    assert model[0].out_channels + model[3].out_channels == 14 - 4
    ids = {id(p) for p in model.parameters()}
    assert ids == {id(p) for g in opt.param_groups for p in g["params"]}
    # the momentum of every parameter, resized ones included, follows it (sliced, not dropped)
    for p in model.parameters():
        assert opt.state[p]["momentum_buffer"].shape == p.shape


def test_fisher_criterion_at_the_producers_shares_one_gate_per_residual_channel():
    """gate="producer": the conv outputs of both branches, summed per sample before squaring."""
    from secateur.criteria.group import FisherCriterion
    from secateur.graph import DependencyGraph

    torch.manual_seed(0)
    model = _Res().eval()
    graph = DependencyGraph.build(model, torch.randn(1, 1, 5, 5))
    ids = [gi for gi, g in enumerate(graph.groups) if g.n_prunable]
    crit = FisherCriterion(gate="producer")
    crit.attach(model, graph, ids)
    outs = []

    def keep(module, args, out):
        out.retain_grad()
        outs.append(out)

    model.c1.register_forward_hook(keep)
    model.c2.register_forward_hook(keep)
    x, y = torch.randn(6, 1, 5, 5), torch.randint(0, 3, (6,))
    F.cross_entropy(model(x), y).backward()
    crit.detach()
    (s,) = crit.scores(model, graph, ids).values()
    dz = sum((o * o.grad).sum((2, 3)) for o in outs)
    torch.testing.assert_close(torch.from_numpy(s), dz.double().pow(2).sum(0) / 12)


def test_prune_one_in_training_mode_leaves_batchnorm_statistics_alone():
    """The oracle's forwards must not reach the BatchNorm running statistics of a model in training."""
    model = _net().train()
    fp = FisherPruner(model, torch.randn(2, 1, 6, 6) * 5 + 3)
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()
    before = {n: b.clone() for n, b in model.named_buffers()}
    rec = fp.prune_one()
    bn = {"0.weight:0": "1", "3.weight:0": "4"}[rec["group"]]  # the BatchNorm after the pruned conv
    for name, b in model.named_buffers():
        expect = before[name]
        if name.startswith(f"{bn}.") and b.dim() == 1:
            expect = torch.cat([expect[: rec["unit"]], expect[rec["unit"] + 1 :]])
        assert torch.equal(b, expect), name
