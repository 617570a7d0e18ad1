"""Pruning at initialisation: SNIP, GraSP and SynFlow through prune_at_init."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateur.allocation.element import global_
from secateur.criteria.element.at_init import GraSP
from secateur.errors import ConfigError
from secateur.masks import masked_parameters
from secateur.methods import prune_at_init
from secateur.scope import Scope


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


def test_snip_prunes_the_lowest_abs_w_times_g_globally():
    model = mlp()
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    w = {n: model[i].weight.detach().clone() for n, i in (("0.weight", 0), ("2.weight", 2))}
    ref = mlp()
    ref.load_state_dict(model.state_dict())
    F.cross_entropy(ref(x), y).backward()
    sal = {n: (w[n] * ref[i].weight.grad).abs() for n, i in (("0.weight", 0), ("2.weight", 2))}
    expected = global_(sal, 0.7)
    pruner = prune_at_init(model, "snip", 0.7, data=(x, y))
    for n, m in pruner.masks().items():
        assert torch.equal(m, expected[n])
    assert pruner.sparsity() == pytest.approx(0.7, abs=0.01)


def test_grasp_prunes_the_papers_highest_scores():
    model = mlp()
    batch = (torch.randn(16, 6), torch.randint(0, 4, (16,)))
    ours = GraSP(model, batch).scores(Scope().resolve(model))
    paper = {n: -s for n, s in ours.items()}  # S(-θ) = -θ ⊙ Hg
    allp = torch.cat([p.flatten() for p in paper.values()])
    k = int(0.5 * allp.numel())
    highest = torch.sort(allp, descending=True).values[k - 1]
    pruner = prune_at_init(model, "grasp", 0.5, data=batch)
    for n, m in pruner.masks().items():
        assert torch.all(paper[n][~m] >= highest)
        assert torch.all(paper[n][m] <= highest)


def test_grasp_removes_the_weights_whose_removal_lowers_gradient_flow_least():
    """Wang et al. 2020, sec. 4: removing weight q changes the gradient norm ||g||² by about
    2·S(-θ_q) = -2·θ_q·(Hg)_q; GraSP removes the weights with the *largest* change (gradient flow
    grows or shrinks least) and keeps those whose removal would shrink it most. Here that change
    is measured directly by finite differences of ||∇L||² along δ = -ε·θ_q·e_q, independently of
    any Hessian-vector product, and the pruned set must be exactly its top half."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    ref = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    ref.load_state_dict(model.state_dict())
    layers = {"0.weight": ref[0], "2.weight": ref[2]}

    def grad_norm2() -> float:
        g = torch.autograd.grad(F.cross_entropy(ref(x), y), [m.weight for m in layers.values()])
        return float(sum((t * t).sum() for t in g))

    eps, change = 1e-5, {}
    for name, layer in layers.items():
        w = layer.weight
        d = torch.zeros_like(w)
        for idx in np.ndindex(*w.shape):
            theta = float(w.detach()[idx])
            with torch.no_grad():
                w[idx] = theta * (1 - eps)  # a small step of the removal δ = -θ e_q
            plus = grad_norm2()
            with torch.no_grad():
                w[idx] = theta * (1 + eps)
            minus = grad_norm2()
            with torch.no_grad():
                w[idx] = theta
            d[idx] = (plus - minus) / (2 * eps)  # d||g||²/dε along the removal
        change[name] = d
    allc = torch.cat([c.flatten() for c in change.values()])
    k = int(0.5 * allc.numel())
    threshold = torch.sort(allc, descending=True).values[k - 1]
    # GraSP's own score is that change, halved and negated (θ ⊙ Hg = -S = -change / 2) ...
    ours = GraSP(model, (x, y)).scores(Scope().resolve(model))
    for name in layers:
        assert torch.allclose(-2 * ours[name], change[name], rtol=1e-4, atol=1e-8)
    # ... and the pruner removes the top half of the change (the paper's highest scores)
    masks = prune_at_init(model, "grasp", 0.5, data=(x, y)).masks()
    for name in layers:
        assert torch.equal(~masks[name], change[name] >= threshold)


def synflow_scores_by_formula(ws):
    """Linear chain: score(W_l) = |W_l| ⊙ (1ᵀ|W_L..W_{l+1}|)ᵀ (|W_{l-1}..W_1| 1)ᵀ."""
    out = []
    for l, w in enumerate(ws):
        left = torch.ones(ws[-1].shape[0], dtype=torch.float64)
        for v in reversed(ws[l + 1 :]):
            left = left @ v
        right = torch.ones(ws[0].shape[1], dtype=torch.float64)
        for v in ws[:l]:
            right = v @ right
        out.append(w * torch.outer(left, right))
    return out


def test_synflow_iterative_rounds_match_an_independent_loop():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(5, 7, bias=False), nn.Linear(7, 6, bias=False), nn.Linear(6, 3, bias=False)
    )
    init = [m.weight.detach().clone() for m in model]
    rounds, sp = 10, 0.9
    pruner = prune_at_init(model, "synflow", sp, rounds=rounds, example_inputs=torch.randn(2, 5))
    # Independent loop: masked |W|, path-product scores, exponential schedule, global allocation.
    names = ["0.weight", "1.weight", "2.weight"]
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in zip(names, init)}
    for r in range(1, rounds + 1):
        ws = [(w.double().abs() * masks[n]) for n, w in zip(names, init)]
        scores = dict(zip(names, synflow_scores_by_formula(ws)))
        masks = global_(scores, 1 - (1 - sp) ** (r / rounds), previous=masks)
    got = pruner.masks()
    for n in names:
        assert torch.equal(got[n], masks[n])
    assert pruner.sparsity() == pytest.approx(sp, abs=0.01)
    assert len(pruner.history) == rounds
    # Signs and values of the survivors are the initial ones.
    for m, w, n in zip(model, init, names):
        assert torch.equal(m.weight.detach()[got[n]], w[got[n]])


def test_default_synflow_rounds_and_data_errors():
    model = mlp()
    pruner = prune_at_init(model, "synflow", 0.5, example_inputs=torch.randn(1, 6))
    assert len(pruner.history) == 100
    fresh = mlp()
    with pytest.raises(ConfigError, match="needs data"):
        prune_at_init(fresh, "snip", 0.5)
    with pytest.raises(ConfigError, match="input shape"):
        prune_at_init(fresh, "synflow", 0.5)
    assert not list(masked_parameters(fresh))
