"""Shared by the method tests: the gradients the Trainer hands to ``optimizer.step()`` on one batch."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from secateur.data import TensorLoader
from secateur.train import Trainer


class GradRecorder:
    """Trainer callback (put it last): copies ``p.grad`` of ``params`` at the first ``on_after_backward``,
    i.e. after every earlier callback edited them and before the optimizer step."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.grads: list[torch.Tensor | None] | None = None

    def on_after_backward(self, trainer: Any) -> None:
        if self.grads is None:
            self.grads = [None if p.grad is None else p.grad.clone() for p in self.params]


def trainer_grads(model: nn.Module, method: Any, x: torch.Tensor, y: torch.Tensor, params: list) -> list:
    """Run the Trainer for one step on the batch ``(x, y)`` with ``method`` as a callback; return the
    gradients of ``params`` as the optimizer saw them."""
    rec = GradRecorder(params)
    Trainer(
        model,
        TensorLoader(x, y, len(x)),
        epochs=1,
        lr=0.01,
        callbacks=[method, rec],
        progress=False,
        log_every=0,
    ).fit()
    assert rec.grads is not None
    return rec.grads


def own_loop_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, params: list, extra=None, after=None):
    """One own-loop backward in train mode: ``CE + extra()``, then ``after()``; ``params``' gradients."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    if extra is not None:
        loss = loss + extra()
    loss.backward()
    if after is not None:
        after()
    return [None if p.grad is None else p.grad.clone() for p in params]


def assert_no_hooks(model: nn.Module) -> None:
    """No tensor hook on any parameter and no forward/backward hook on any module."""
    for name, p in model.named_parameters():
        assert not getattr(p, "_backward_hooks", None), name
    for name, m in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            assert not getattr(m, attr, None), (name, attr)
