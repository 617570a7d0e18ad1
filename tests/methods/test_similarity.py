"""Network similarity: linear CKA (Kornblith et al. 2019) and gradient kernels (Tang et al. 2020)."""

import copy

import pytest
import torch
from torch import nn

from secateur.analysis.similarity import (
    cka,
    gradient_gram,
    layer_cka,
    linear_cka,
    network_similarity,
    similarity_report,
)
from secateur.errors import ConfigError
from secateur.pruners.oneshot import prune_channels


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def test_cka_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 12, generator=g)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, x.double() @ q) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x, 7.5 * x) == pytest.approx(1.0, abs=1e-12)
    y = torch.randn(40, 5, generator=g)
    base = linear_cka(x, y)
    assert base < 0.9
    assert linear_cka(x.double() @ q * 0.1, y) == pytest.approx(base, abs=1e-10)
    # against the feature-space formula (eq. 5)
    xc, yc = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    ref = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert base == pytest.approx(float(ref), abs=1e-12)


def test_self_similarity_is_one_and_other_seed_less():
    a, b = _net(0), _net(1)
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    assert network_similarity(a, copy.deepcopy(a), x, y, "gradient") == pytest.approx(1.0)
    assert network_similarity(a, a, x, None, "activation") == pytest.approx(1.0)
    rep = similarity_report(a, b, x, y)
    assert 0.0 <= rep["gradient_cka"] < 0.999 and 0.0 <= rep["activation_cka"] < 0.999
    m = layer_cka(a, a, x, ["1", "3"], ["1", "3"])
    assert torch.allclose(m.diagonal(), torch.ones(2, dtype=torch.float64))


def test_dense_vs_pruned_has_different_sizes():
    a = _net(0)
    pruned = copy.deepcopy(a)
    prune_channels(pruned, torch.randn(2, 8), 0.5, criterion=lambda g, m: torch.rand(g.n_units).numpy())
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in a.parameters())
    x = torch.randn(12, 8)
    s = network_similarity(a, pruned, x, kind="gradient")
    assert 0.0 <= s <= 1.0


def test_gradient_gram_keeps_existing_grads_and_errors():
    a = _net(0)
    a[0].weight.grad = torch.ones_like(a[0].weight)
    k = gradient_gram(a, torch.randn(5, 8))
    assert k.shape == (5, 5) and torch.equal(a[0].weight.grad, torch.ones_like(a[0].weight))
    with pytest.raises(ConfigError):
        gradient_gram(a, torch.randn(5, 8), params=["nope"])
    with pytest.raises(ConfigError):
        cka(torch.ones(3, 3), torch.ones(2, 2))
    with pytest.raises(ConfigError):
        network_similarity(a, a, torch.randn(3, 8), kind="cosine")
