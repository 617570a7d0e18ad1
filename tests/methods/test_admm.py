"""ADMM (Zhang et al. 2018): Z is the projection of W + U, residuals fall, hard pruning is exact."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from trainer_grads import assert_no_hooks, own_loop_grads, trainer_grads

from secateur.errors import ConfigError
from secateur.masks import get_mask
from secateur.masks.patterns import check_nm_mask
from secateur.methods.admm import ADMM, project


def _topk_projection(v: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = v.numel() - int(sparsity * v.numel())
    idx = v.abs().flatten().topk(k).indices
    out = torch.zeros_like(v).flatten()
    out[idx] = v.flatten()[idx]
    return out.reshape(v.shape)


def _regression(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 16, generator=g)
    w_true = torch.randn(4, 16, generator=g) * (torch.rand(4, 16, generator=g) < 0.3)
    return x, x @ w_true.T


def test_z_is_topk_projection_of_w_plus_u():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    admm = ADMM(model, sparsity=0.75, rho=0.1)
    with torch.no_grad():
        for t in admm.targets:
            admm.U[t.name].normal_()
    u_before = {k: v.clone() for k, v in admm.U.items()}
    admm.step()
    for t in admm.targets:
        w = t.module.weight.detach()
        expect = _topk_projection(w + u_before[t.name], 0.75)
        assert torch.equal(admm.Z[t.name], expect)
        assert int((admm.Z[t.name] != 0).sum()) == w.numel() - int(0.75 * w.numel())
        torch.testing.assert_close(admm.U[t.name], u_before[t.name] + w - expect)


def test_primal_residual_falls():
    torch.manual_seed(0)
    x, y = _regression()
    model = nn.Sequential(nn.Linear(16, 4, bias=False))
    admm = ADMM(model, sparsity=0.7, rho=0.05, rho_growth=1.5, rho_max=10.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(16):
        for _ in range(20):
            loss = F.mse_loss(model(x), y) + admm.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
        admm.step()
    primal = [h["primal"] for h in admm.history]
    assert primal[-1] < 0.1 * primal[0]
    assert all(b <= a * 1.05 for a, b in zip(primal[2:], primal[3:]))
    masks = admm.finalize()
    m = masks["0.weight"]
    assert int(m.sum()) == 64 - int(0.7 * 64)
    assert torch.equal(get_mask(model[0]), m)
    assert float(model[0].weight.detach()[~m].abs().sum()) == 0.0


def test_filter_and_nm_projections():
    v = torch.randn(6, 3, 2, 2)
    z = project(v, "filter", 0.5)
    kept = (z.reshape(6, -1) != 0).any(1)
    assert int(kept.sum()) == 3
    norms = v.reshape(6, -1).norm(dim=1)
    assert set(kept.nonzero().flatten().tolist()) == set(norms.topk(3).indices.tolist())
    z = project(torch.randn(4, 8), "2:4")
    assert check_nm_mask(z != 0, 2, 4)


def test_trainer_path_and_own_loop_give_identical_gradients():
    torch.manual_seed(0)
    m1 = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    m0, m2 = copy.deepcopy(m1), copy.deepcopy(m1)
    a1, a2 = ADMM(m1, sparsity=0.5, rho=0.3), ADMM(m2, sparsity=0.5, rho=0.3)
    for a in (a1, a2):
        for k in a.U:
            a.U[k].normal_(generator=torch.Generator().manual_seed(1))
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    plain = own_loop_grads(m0, x, y, [m0[0].weight, m0[2].weight])
    own = own_loop_grads(m1, x, y, [m1[0].weight, m1[2].weight], extra=a1.penalty)
    via = trainer_grads(m2, a2, x, y, [m2[0].weight, m2[2].weight])
    for g_plain, g_own, g_via, t in zip(plain, own, via, a1.targets):
        torch.testing.assert_close(g_via, g_own, rtol=0, atol=0)
        # the penalty's gradient is ρ (W − Z + U) (Zhang et al. 2018, eq. 6)
        w = t.module.weight.detach()
        torch.testing.assert_close(g_own - g_plain, 0.3 * (w - a1.Z[t.name] + a1.U[t.name]))
    assert_no_hooks(m2)


def test_bad_input_leaves_model_untouched():
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="0.weight"):
        ADMM(model, pattern="2:4")  # 6 inputs not divisible by 4
    with pytest.raises(ConfigError):
        ADMM(model, sparsity=1.5)
    with pytest.raises(ConfigError):
        ADMM(model, sparsity=0.5, pattern="blocky")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_trainer_callback_runs_updates_and_finalizes():
    from secateur.data import TensorLoader
    from secateur.train import Trainer

    torch.manual_seed(0)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    admm = ADMM(model, sparsity=0.5, rho=0.01, update_every=2, finalize_at_end=True)
    Trainer(model, TensorLoader(x, y, 8), epochs=1, lr=0.01, callbacks=[admm], progress=False).fit()
    assert len(admm.history) == 2
    assert int(get_mask(model[0]).sum()) == 64
