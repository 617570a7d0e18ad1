import pytest
import torch
from torch import nn

from secateur.errors import ConfigError
from secateur.train import recalibrate_bn


def test_running_stats_equal_the_batch_statistics():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(bn).eval()
    bn.running_mean.fill_(7.0)
    bn.running_var.fill_(9.0)
    xs = [torch.randn(8, 3, 5, 5) * 2 + 1 for _ in range(3)]
    assert recalibrate_bn(model, [(x, torch.zeros(8, dtype=torch.long)) for x in xs]) == 3
    # Cumulative average over equal-sized batches = mean of per-batch statistics (reference in float64:
    # BatchNorm's float32 reductions run in another order, so compare within float32 accuracy).
    means = torch.stack([x.double().mean(dim=(0, 2, 3)) for x in xs]).mean(0)
    vars_ = torch.stack([x.double().var(dim=(0, 2, 3), unbiased=True) for x in xs]).mean(0)
    torch.testing.assert_close(bn.running_mean.double(), means, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), vars_, rtol=1e-5, atol=1e-6)
    assert not model.training and bn.momentum == 0.1


def test_recalibration_restores_accuracy_of_a_pruned_net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    x = torch.randn(16, 1, 8, 8)
    recalibrate_bn(model, [x])
    with torch.no_grad():
        model[0].weight.mul_(torch.tensor([1.0, 0.0, 1.0, 0.0]).view(4, 1, 1, 1))  # prune two filters
    stale = model[1].running_mean.clone()
    recalibrate_bn(model, [x])
    assert not torch.allclose(stale, model[1].running_mean)
    import copy

    reference = copy.deepcopy(model).train()  # normalises with the batch's own statistics
    with torch.no_grad():
        expected = reference(x)
    model.eval()
    with torch.no_grad():
        # Equal up to the unbiased (running) vs biased (batch) variance, n = 16*6*6 values per channel.
        assert torch.allclose(model(x), expected, atol=5e-3)


def test_errors():
    with pytest.raises(ConfigError, match="no BatchNorm"):
        recalibrate_bn(nn.Linear(2, 2), [torch.randn(1, 2)])
    with pytest.raises(ConfigError, match="no batch"):
        recalibrate_bn(nn.Sequential(nn.BatchNorm1d(2)), [])
