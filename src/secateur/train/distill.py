"""Recovery by knowledge distillation: the dense model teaches its pruned copy.

After pruning, fine-tuning on the task loss alone recovers part of the accuracy; matching the dense
model's softened output distribution recovers more for the same number of steps, because the teacher's
logits carry the "dark knowledge" of how classes relate (Hinton, Vinyals & Dean, "Distilling the
Knowledge in a Neural Network", 2015, Sec. 2). This module holds the loss and a :class:`Trainer`
callback that adds it to the task loss; the LLM recovery loop (``secateur.llm``) uses the same loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from secateur._torch import call_model, eval_mode
from secateur.errors import ConfigError

__all__ = ["Distillation", "kd_loss"]

LogitsFn = Callable[[Any], torch.Tensor]


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 4.0,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Distillation loss ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, averaged over positions.

    Hinton et al. (2015), Sec. 2: the gradient of the softened cross-entropy scales as ``1/T²``, so
    the ``T²`` factor keeps its magnitude comparable to the task loss's for any temperature. The KL
    differs from that cross-entropy by the teacher's entropy, a constant for the student.

    Args:
        student_logits: ``(..., C)`` logits; every leading position (batch, sequence) is one
            distribution over the last dimension's ``C`` classes or tokens.
        teacher_logits: the same shape; treated as constants (no gradient flows into the teacher).
        temperature: ``T > 0``; 1 compares the plain distributions.
        chunk_size: compute the KL over at most this many positions at a time (the log-softmax of a
            large vocabulary, e.g. 262k tokens, is the largest temporary otherwise); the result is the
            same sum, only the memory peak changes. ``None``: all at once.

    Returns:
        A scalar tensor (float32 or the logits' dtype): the mean over positions of the per-position KL,
        times ``T²``.

    Raises:
        ConfigError: shapes differ, ``temperature <= 0`` or ``chunk_size < 1``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(
            f"kd_loss: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ConfigError(f"kd_loss: temperature must be a number > 0, got {temperature!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ConfigError(f"kd_loss: chunk_size must be an int >= 1 or None, got {chunk_size!r}")
    c = student_logits.shape[-1]
    s = student_logits.reshape(-1, c)
    t = teacher_logits.detach().reshape(-1, c)
    n = s.shape[0]
    step = n if chunk_size is None else chunk_size
    total = s.new_zeros(())
    for i in range(0, n, max(step, 1)):
        log_p_s = F.log_softmax(s[i : i + step] / temperature, dim=-1)
        log_p_t = F.log_softmax(t[i : i + step] / temperature, dim=-1)
        total = total + F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
    return total / max(n, 1) * temperature**2


class Distillation:
    """:class:`secateur.train.Trainer` callback: adds ``alpha · kd_loss(student, teacher)`` to the task loss.

    The total loss per step is ``CE(student(x), y) + alpha · T² · KL(teacher(x)/T ‖ student(x)/T)``
    (Hinton et al. 2015, Sec. 2, with the task term kept at weight 1). The teacher runs in eval mode under
    ``torch.no_grad`` on the same batch as the student; it is left as it was (its training flags and
    ``requires_grad`` are restored after every call, its parameters never updated). Typical use: the dense
    model teaches the pruned one during fine-tuning (``teacher = copy.deepcopy(model)`` before pruning).

    Args:
        teacher: the dense model (run in eval mode, without gradients).
        temperature: ``T > 0`` (Hinton et al. use 1–20; 4 is common for image classifiers).
        alpha: weight of the distillation term (>= 0).
        logits_fn: maps a model's output to logits ``(..., C)`` (default: the output itself, or its
            ``.logits`` attribute for Hugging Face outputs).
        chunk_size: passed to :func:`kd_loss`.

    Raises:
        ConfigError: ``teacher`` is not an ``nn.Module``, ``alpha < 0`` or ``temperature <= 0``; at a
            step, the trainer exposes no batch (``trainer.batch_inputs``) or the logits' shapes differ.
    """

    def __init__(
        self,
        teacher: nn.Module,
        *,
        temperature: float = 4.0,
        alpha: float = 1.0,
        logits_fn: LogitsFn | None = None,
        chunk_size: int | None = None,
    ) -> None:
        if not isinstance(teacher, nn.Module):
            raise ConfigError(f"Distillation: teacher must be an nn.Module, got {type(teacher).__name__}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha >= 0:
            raise ConfigError(f"Distillation: alpha must be a number >= 0, got {alpha!r}")
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
            raise ConfigError(f"Distillation: temperature must be a number > 0, got {temperature!r}")
        self.teacher = teacher
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.logits_fn = logits_fn or _logits
        self.chunk_size = chunk_size

    def loss(self, inputs: Any, student_logits: torch.Tensor) -> torch.Tensor:
        """``alpha · kd_loss`` of ``student_logits`` against the teacher's logits on ``inputs``."""
        with torch.no_grad(), eval_mode(self.teacher):
            teacher_logits = self.logits_fn(call_model(self.teacher, inputs))
        teacher_logits = teacher_logits.to(student_logits.dtype)
        kd = kd_loss(student_logits, teacher_logits, self.temperature, chunk_size=self.chunk_size)
        return self.alpha * kd

    def extra_loss(self, trainer: Any) -> torch.Tensor | None:
        """Trainer hook: the distillation term for ``trainer.batch_inputs`` / ``batch_logits``."""
        if self.alpha == 0:
            return None
        inputs = getattr(trainer, "batch_inputs", None)
        logits = getattr(trainer, "batch_logits", None)
        if inputs is None or logits is None:
            raise ConfigError(
                "Distillation: the trainer exposes no current batch (batch_inputs / batch_logits); "
                "use secateur.train.Trainer or call Distillation.loss(inputs, logits) in your own loop"
            )
        return self.loss(inputs, logits)


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ConfigError(
        f"Distillation: cannot find logits in a {type(output).__name__} output; pass logits_fn=..."
    )
