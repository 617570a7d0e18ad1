"""Movement pruning (Sanh et al. 2020): straight-through score gradient, exact top-v, schedules."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from trainer_grads import assert_no_hooks, own_loop_grads, trainer_grads

from secateur.errors import ConfigError
from secateur.masks import get_mask
from secateur.methods.movement import Movement


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def test_score_gradient_is_grad_wprime_times_w():
    torch.manual_seed(0)
    model = _net()
    w_conv = model[0].weight.detach().clone()
    w_lin = model[3].weight.detach().clone()
    mv = Movement(model, sparsity=0.5, mode="hard", start=0, end=0)
    x, y = torch.randn(5, 1, 6, 6), torch.tensor([0, 1, 2, 0, 1])
    # Reference: the same network with W' = W * M as plain tensors, gradient w.r.t. W'.
    wp_conv = (w_conv * mv.masks["0.weight"].mask()).requires_grad_()
    wp_lin = (w_lin * mv.masks["3.weight"].mask()).requires_grad_()
    h = F.relu(F.conv2d(x, wp_conv, model[0].bias.detach()))
    ref = F.cross_entropy(F.linear(h.flatten(1), wp_lin, model[3].bias.detach()), y)
    ref.backward()
    F.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(mv.masks["0.weight"].scores.grad, wp_conv.grad * w_conv)
    torch.testing.assert_close(mv.masks["3.weight"].scores.grad, wp_lin.grad * w_lin)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77, 0.9])
def test_hard_movement_keeps_floor_r_n(sparsity):
    model = _net()
    mv = Movement(model, sparsity=sparsity, mode="hard", start=0, end=0)
    with torch.no_grad():
        for s in mv.scores():
            s.normal_()
            s[0].fill_(0.25)  # ties must not change the count
    r = 1.0 - sparsity
    for name, mm in mv.masks.items():
        n = mm.scores.numel()
        assert int(mm.mask().sum()) == math.floor(r * n + 1e-9), name
    kept_w = model[3].weight  # effective weight
    assert int((kept_w != 0).sum()) <= math.floor(r * kept_w.numel() + 1e-9)


def test_cubic_schedule_and_finalize():
    torch.manual_seed(0)
    model = _net()
    mv = Movement(model, sparsity=0.8, mode="hard", start=2, end=10, every=2)
    assert mv.remaining_at(0) == 1.0 and mv.remaining_at(2) == 1.0
    assert mv.remaining_at(10) == pytest.approx(0.2) and mv.remaining_at(50) == pytest.approx(0.2)
    assert mv.remaining_at(6) == pytest.approx(1 - 0.8 * (1 - 0.5**3))
    assert mv.remaining_at(7) == mv.remaining_at(6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    for step in range(12):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        mv.update(step + 1)
    masks = mv.finalize()
    assert int(masks["3.weight"].sum()) == math.floor(0.2 * 192 + 1e-9)
    assert torch.equal(get_mask(model[3]), masks["3.weight"])
    assert not any("scores" in n for n, _ in model.named_parameters())


def test_soft_movement_trainer_path_equals_own_loop_and_penalty_gradient():
    torch.manual_seed(0)
    m0, m1, m2 = _net(), _net(), _net()
    m1.load_state_dict(m0.state_dict())
    m2.load_state_dict(m0.state_dict())
    z = Movement(m0, mode="soft", lam=0.0, tau=0.5, init_score=0.3)
    a = Movement(m1, mode="soft", lam=0.01, tau=0.5, init_score=0.3)
    b = Movement(m2, mode="soft", lam=0.01, tau=0.5, init_score=0.3)
    with torch.no_grad():  # distinct scores so that σ'(S) differs entry by entry
        for mv in (z, a, b):
            for s in mv.scores():
                s.copy_(torch.linspace(0.1, 2.0, s.numel()).reshape(s.shape))
    x, y = torch.randn(4, 1, 6, 6), torch.randint(0, 3, (4,))
    plain = own_loop_grads(m0, x, y, z.scores())
    own = own_loop_grads(m1, x, y, a.scores(), extra=a.penalty)
    via = trainer_grads(m2, b, x, y, b.scores())
    for g0, g1, g2, s in zip(plain, own, via, a.scores()):
        torch.testing.assert_close(g2, g1, rtol=0, atol=0)
        sig = torch.sigmoid(s.detach())
        torch.testing.assert_close(g1 - g0, 0.01 * sig * (1 - sig))  # d/dS of λ Σ σ(S)
    assert b.extra_loss(None) is not None and Movement(_net(), mode="hard").extra_loss(None) is None
    b.finalize()
    assert_no_hooks(m2)
    with torch.no_grad():
        a.scores()[0].fill_(-1.0)  # sigmoid(-1) < 0.5: all pruned
    assert int(a.masks["0.weight"].mask().sum()) == 0


def test_bad_config():
    with pytest.raises(ConfigError):
        Movement(_net(), mode="medium")
    with pytest.raises(ConfigError):
        Movement(_net(), sparsity=1.0)
    with pytest.raises(ConfigError):
        Movement(_net(), mode="soft", init_score=-3.0)
    model = _net()
    Movement(model)
    with pytest.raises(ConfigError, match="0.weight"):
        Movement(model)


def test_transformer_linears_and_trainer_callback():
    from secateur.data import TensorLoader
    from secateur.train import Trainer
    from secateur.zoo import create_model

    torch.manual_seed(0)
    vit = create_model("vit_tiny")
    mv = Movement(vit, sparsity=0.5, mode="hard", start=0, end=2)
    assert any("attn" in n or "qkv" in n for n in mv.masks)
    loader = TensorLoader(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)), 4)
    Trainer(vit, loader, epochs=1, lr=0.01, callbacks=[mv], progress=False).fit()
    assert mv.remaining_at(2) == pytest.approx(0.5)
    for name, mm in mv.masks.items():
        assert int(mm.mask().sum()) == math.floor(0.5 * mm.scores.numel() + 1e-9), name
