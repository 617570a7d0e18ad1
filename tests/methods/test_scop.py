"""SCOP (Tang et al. 2020): the mixing layer's limits, β in [0, 1], knockoff VAE, graph removal."""

import pytest
import torch
from tiny_nets import conv_bn_net
from torch import nn
from trainer_grads import assert_no_hooks

from secateur.data import TensorLoader
from secateur.errors import ConfigError
from secateur.methods.scop import SCOP, KnockoffVAE, train_knockoff_vae


def _net() -> nn.Module:
    torch.manual_seed(0)
    return conv_bn_net().eval()


def test_beta_one_is_plain_network_and_beta_zero_is_knockoff_path():
    model = _net()
    x, xk = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    plain_real, plain_ko = model(x), model(xk)
    scop = SCOP(model, knockoff=lambda n: torch.randn(n, 1, 8, 8), init_beta=1.0)
    torch.testing.assert_close(scop(x, xk), plain_real)
    with torch.no_grad():
        for b in scop.betas():
            b.fill_(0.0)
    torch.testing.assert_close(scop(x, xk), plain_ko)
    torch.testing.assert_close(model(x), plain_real)  # a plain call is not mixed
    scop.detach()
    torch.testing.assert_close(model(x), plain_real)


def test_beta_stays_in_unit_interval_and_only_beta_learns():
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = TensorLoader(torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,)), 8, shuffle=True)
    scop = SCOP(model, knockoff=lambda n: torch.randn(n, 1, 8, 8))
    scop.fit(loader, steps=10, lr=5.0)  # a huge step pushes β against the bounds
    for b in scop.betas():
        assert float(b.detach().min()) >= 0.0 and float(b.detach().max()) <= 1.0
    assert any(float((b.detach() - 0.5).abs().max()) > 0.1 for b in scop.betas())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in model.parameters())


def test_scores_and_removal_through_graph():
    model = _net()
    scop = SCOP(model, knockoff=lambda n: torch.randn(n, 1, 8, 8))
    with torch.no_grad():
        scop.beta["0"].copy_(torch.tensor([1.0, 0.1, 1.0, 1.0, 0.2, 1.0]))
        scop.beta["3"].fill_(1.0)
        model[1].weight.fill_(1.0)
        model[4].weight.fill_(1.0)
    model, plan = scop.prune(torch.randn(2, 1, 8, 8), sparsity=2 / 14)
    assert model[0].out_channels == 4 and model[3].in_channels == 4 and model[3].out_channels == 8


def test_knockoff_vae_trains_and_samples():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 6, 6, generator=g) * 0.5 + 1.0
    loader = TensorLoader(x, torch.zeros(64, dtype=torch.long), 16, shuffle=True)
    vae = train_knockoff_vae(loader, epochs=30, latent=4, hidden=32)
    s = vae(10)
    assert s.shape == (10, 1, 6, 6)
    assert abs(float(s.mean()) - 1.0) < 0.3  # samples follow the data's distribution roughly
    assert isinstance(vae, KnockoffVAE)


def test_errors():
    with pytest.raises(ConfigError):
        SCOP(_net(), knockoff=lambda n: torch.randn(n, 1, 8, 8), layers=["1"])
    with pytest.raises(ConfigError):
        SCOP(_net(), knockoff=lambda n: torch.randn(n, 1, 8, 8), init_beta=2.0)
    scop = SCOP(_net(), knockoff=lambda n: torch.randn(n, 1, 4, 4))
    with pytest.raises(ConfigError):
        scop(torch.randn(2, 1, 8, 8))


def test_scop_is_a_group_criterion_the_driver_uses():
    """scop.prune, ChannelPruner(criterion=scop) and prune_channels(criterion=scop) remove the same units."""
    from secateur.pruners.channel import ChannelPruner
    from secateur.pruners.oneshot import prune_channels

    x = torch.randn(2, 1, 8, 8)
    plans = []
    for how in ("prune", "pruner", "prune_channels"):
        model = _net()
        scop = SCOP(model, knockoff=lambda n: torch.randn(n, 1, 8, 8))
        with torch.no_grad():
            scop.beta["0"].copy_(torch.tensor([1.0, 0.1, 0.9, 1.0, 0.2, 0.6]))
            scop.beta["3"].copy_(torch.linspace(0.0, 1.0, 8))
        if how == "prune":
            _, plan = scop.prune(x, sparsity=0.5, allocation="uniform")
        elif how == "pruner":
            pruner = ChannelPruner(model, x, schedule=0.5, criterion=scop, allocation="uniform")
            pruner.step(0)
            pruner.finalize()
            plan = pruner.plan
        else:
            _, plan = prune_channels(model, x, 0.5, criterion=scop, allocation="uniform")
        assert_no_hooks(model)  # the driver detached the mixing hooks
        plans.append(plan["groups"])
    assert plans[0] == plans[1] == plans[2]
    removed = {g["group"]: g["removed"] for g in plans[0]}
    assert removed == {"0.weight:0": [1, 4, 5], "3.weight:0": [0, 1, 2, 3]}
