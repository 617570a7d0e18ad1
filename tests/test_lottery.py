"""Lottery tickets: rewinding restores exactly the weights saved at iteration k."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateur.errors import ConfigError
from secateur.masks import get_mask
from secateur.methods import LotteryTicket


def net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    )


def data(n: int = 6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def effective_state(model: nn.Module) -> dict:
    """Parameters as forward sees them (masked) plus buffers, by plain attribute access."""
    return {
        "conv.w": model[0].weight.detach().clone(),
        "conv.b": model[0].bias.detach().clone(),
        "bn.w": model[1].weight.detach().clone(),
        "bn.b": model[1].bias.detach().clone(),
        "bn.mean": model[1].running_mean.clone(),
        "bn.var": model[1].running_var.clone(),
        "fc.w": model[4].weight.detach().clone(),
        "fc.b": model[4].bias.detach().clone(),
    }


def train(model, opt, lt, batches, saved_at=None, k=None):
    for step, (x, y) in enumerate(batches):
        lt.observe(step)
        if step == k and saved_at is not None:
            saved_at.update(effective_state(model))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_rewinding_restores_exactly_the_weights_of_iteration_k():
    model = net()
    lt = LotteryTicket(model, rewind_step=2, rate=0.2, rounds=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    theta_k: dict = {}
    train(model, opt, lt, data(), theta_k, k=2)
    trained = effective_state(model)
    assert not torch.equal(trained["fc.w"], theta_k["fc.w"])

    previous_pruned = None
    for r in (1, 2):
        if r == 2:
            train(model, opt, lt, data())
        masks = lt.next_round()
        total = sum(m.numel() for m in masks.values())
        pruned = sum(int((~m).sum()) for m in masks.values())
        assert pruned == int(total * (1 - 0.8**r)) or abs(pruned - total * (1 - 0.8**r)) < 1
        now = effective_state(model)
        for key, mod in (("conv.w", model[0]), ("fc.w", model[4])):
            keep = get_mask(mod)
            assert torch.equal(now[key][keep], theta_k[key][keep])
            assert torch.all(now[key][~keep] == 0)
            # The stored (optimizer) tensor is zero where masked too.
            assert torch.all(mod.parametrizations.weight.original[~keep] == 0)
        for key in ("conv.b", "bn.w", "bn.b", "bn.mean", "bn.var", "fc.b"):
            assert torch.equal(now[key], theta_k[key])
        cur_pruned = {n: ~m.clone() for n, m in masks.items()}
        if previous_pruned is not None:
            for n in masks:
                assert torch.all(cur_pruned[n][previous_pruned[n]])  # pruned weights stay pruned
        previous_pruned = cur_pruned
    with pytest.raises(ConfigError, match="all 2 lottery rounds"):
        lt.next_round()


def test_rewind_to_init_and_errors():
    model = net()
    theta_0 = effective_state(model)
    lt = LotteryTicket(model, rewind_step=0, rate=0.5, rounds=1, allocation="layerwise")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train(model, opt, lt, data(3))
    masks = lt.next_round()
    for key, mod in (("conv.w", model[0]), ("fc.w", model[4])):
        keep = masks[f"{'0' if key == 'conv.w' else '4'}.weight"]
        assert float((~keep).float().mean()) == pytest.approx(0.5, abs=0.02)  # layer-wise
        assert torch.equal(mod.weight.detach()[keep], theta_0[key][keep])

    late = LotteryTicket(net(), rewind_step=100)
    with pytest.raises(ConfigError, match="no weights saved at iteration 100"):
        late.next_round()
    with pytest.raises(ConfigError, match="rate"):
        LotteryTicket(net(), rate=1.5)


def test_lottery_as_trainer_callback():
    trainer_mod = pytest.importorskip("secateur.train.trainer")
    model = net()
    lt = LotteryTicket(model, rewind_step=3, rate=0.2, rounds=1)
    seen = {}

    class Spy:
        def on_step_end(self, trainer):
            if trainer.global_step == 3:
                seen.update(effective_state(model))

    trainer = trainer_mod.Trainer(
        model, data(6), epochs=1, lr=0.05, callbacks=[lt, Spy()], progress=False, log_every=0
    )
    trainer.fit()
    assert lt.round == 1
    for key, mod in (("conv.w", model[0]), ("fc.w", model[4])):
        keep = get_mask(mod)
        assert torch.equal(mod.weight.detach()[keep], seen[key][keep])
        assert torch.all(mod.weight.detach()[~keep] == 0)


# -- rethinking the value of pruning: Scratch-E / Scratch-B -----------------------------------------
def test_scratch_budgets_follow_the_paper():
    from secateur.methods import scratch_budgets

    b = scratch_budgets(160, dense_macs=1000, pruned_macs=800)
    assert b.scratch_e == 160 and b.scratch_b == pytest.approx(160 * 1000 / 800)
    capped = scratch_budgets(160, dense_macs=1000, pruned_macs=100)  # 10x fewer MACs: capped at 2x
    assert capped.scratch_b == 320
    assert scratch_budgets(160, 1000, 100, max_factor=None).scratch_b == pytest.approx(1600)
    with pytest.raises(ConfigError, match="exceed"):
        scratch_budgets(10, 100, 200)


def test_reinitialize_keeps_masks_and_parameter_objects():
    from secateur.methods import reinitialize
    from secateur.pruners.element import Pruner

    model = net()
    pruner = Pruner(model, 0.5)
    pruner.step(0)
    masks = {n: m.clone() for n, m in pruner.masks().items()}
    params = {n: id(p) for n, p in model.named_parameters()}
    before = model[4].weight.detach().clone()
    reinitialize(model, seed=3)
    after = model[4].weight.detach()
    keep = masks["4.weight"]
    assert not torch.equal(after[keep], before[keep])  # new values
    assert torch.all(after[~keep] == 0)  # same sparsity pattern
    assert {n: id(p) for n, p in model.named_parameters()} == params
    for n, m in pruner.masks().items():
        assert torch.equal(m, masks[n])
