"""Knowledge distillation (Hinton et al. 2015): the loss's defining properties and the Trainer callback."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from secateur.data.loader import TensorLoader
from secateur.errors import ConfigError
from secateur.train import Distillation, Trainer, kd_loss


def _logits(seed: int, shape=(6, 5, 11)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3


def test_kd_loss_is_t_squared_times_the_mean_kl_and_zero_only_at_the_teacher():
    s, t = _logits(0), _logits(1)
    temp = 3.0
    p_t = torch.softmax(t / temp, -1)
    expected = (p_t * (torch.log_softmax(t / temp, -1) - torch.log_softmax(s / temp, -1))).sum(-1).mean()
    got = kd_loss(s, t, temp)
    assert torch.allclose(got, expected * temp**2, rtol=1e-12, atol=0)
    assert got > 0
    assert kd_loss(t, t, temp).abs() < 1e-12
    # a shift of all logits of one position leaves its distribution, hence the loss, unchanged
    assert torch.allclose(kd_loss(s + 7.0, t, temp), got, rtol=1e-12, atol=0)


def test_kd_gradient_is_the_difference_of_softened_distributions_times_t():
    """Hinton et al. Sec. 2.1: dL/ds_i = (q_i - p_i) / T for the softened CE; with the T² factor and the
    mean over n positions, T·(q - p)/n."""
    s, t = _logits(2).requires_grad_(True), _logits(3)
    temp = 4.0
    kd_loss(s, t, temp).backward()
    n = s.shape[0] * s.shape[1]
    expected = temp * (torch.softmax(s.detach() / temp, -1) - torch.softmax(t / temp, -1)) / n
    assert torch.allclose(s.grad, expected, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("chunk", [1, 7, 30, 1000])
def test_chunked_loss_is_the_same_sum(chunk):
    s, t = _logits(4), _logits(5)
    assert torch.allclose(kd_loss(s, t, 2.0, chunk_size=chunk), kd_loss(s, t, 2.0), rtol=1e-12, atol=0)


def test_bad_arguments_are_named():
    s = _logits(0)
    with pytest.raises(ConfigError, match="same shape"):
        kd_loss(s, s[:, :2])
    with pytest.raises(ConfigError, match="temperature"):
        kd_loss(s, s, 0.0)
    with pytest.raises(ConfigError, match="chunk_size"):
        kd_loss(s, s, chunk_size=0)
    with pytest.raises(ConfigError, match="teacher"):
        Distillation("resnet")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="alpha"):
        Distillation(nn.Linear(2, 2), alpha=-1)
    with pytest.raises(ConfigError, match="no current batch"):
        Distillation(nn.Linear(2, 2)).extra_loss(object())


def _data(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def _mlp(seed: int, hidden: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 4))


def _kl_to(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(kd_loss(student(x).double(), teacher(x).double(), 4.0))


def test_trainer_callback_pulls_the_student_to_the_teacher_and_leaves_the_teacher_alone():
    x, y = _data()
    teacher = _mlp(0, 32)
    before = copy.deepcopy(teacher.state_dict())

    def fit(alpha: float) -> nn.Module:
        student = _mlp(1, 4)
        cb = Distillation(teacher, alpha=alpha)
        loader = TensorLoader(x, y, 32, shuffle=True, seed=0)
        Trainer(student, loader, epochs=4, lr=0.05, callbacks=[cb], progress=False, log_every=0).fit()
        return student

    plain, distilled = fit(0.0), fit(5.0)
    assert _kl_to(distilled, teacher, x) < 0.5 * _kl_to(plain, teacher, x)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the teacher is left as it was: training flags and requires_grad untouched
    assert all(p.requires_grad for p in teacher.parameters())
    assert teacher.training


def test_alpha_zero_trains_exactly_like_no_callback():
    x, y = _data()

    def fit(callbacks) -> dict:
        student = _mlp(1, 4)
        loader = TensorLoader(x, y, 32, shuffle=True, seed=0)
        Trainer(student, loader, epochs=1, lr=0.05, callbacks=callbacks, progress=False, log_every=0).fit()
        return student.state_dict()

    a, b = fit([]), fit([Distillation(_mlp(0, 32), alpha=0.0)])
    assert all(torch.equal(a[k], b[k]) for k in a)
