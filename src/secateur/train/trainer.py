"""A small supervised trainer with per-iteration LR schedules, callbacks and exact resume.

It exists so that pruning recipes (a pruner is a callback) and the demo share one loop whose
runs repeat bit for bit on CPU, including after a stop and resume from a checkpoint.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from secateur._torch import eval_mode
from secateur.errors import ConfigError, SerializationError
from secateur.train import checkpoint
from secateur.train.ddp import is_main_process
from secateur.train.seed import get_rng_state, set_rng_state

__all__ = ["OPTIMIZERS", "SCHEDULES", "Trainer", "lr_at_step"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
_CALLBACK_HOOKS = (
    "on_train_begin",
    "extra_loss",
    "on_after_backward",
    "on_step_end",
    "on_epoch_end",
    "on_train_end",
)


def lr_at_step(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    schedule: str = "cosine",
    steps_per_epoch: int = 1,
    step_size: int = 1,
    gamma: float = 0.1,
    warmup_steps: int = 0,
    min_lr: float = 0.0,
) -> float:
    """Learning rate for the optimizer step taken after ``step`` steps (step 0 is the first).

    - ``"cosine"``: ``min_lr + (base_lr - min_lr) * (1 + cos(pi * t / T)) / 2`` with ``t`` the
      step after warmup and ``T = total_steps - warmup_steps`` (Loshchilov & Hutter, "SGDR", 2017,
      without restarts), so it reaches ``min_lr`` at the end of training.
    - ``"step"``: ``base_lr * gamma ** (epoch // step_size)``, epochs counted as
      ``step // steps_per_epoch`` (``step_size`` is in epochs).
    - ``"constant"``: ``base_lr``.

    A linear warmup from ``base_lr / warmup_steps`` over the first ``warmup_steps`` steps precedes
    any schedule.

    Raises:
        ConfigError: unknown ``schedule``.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        return base_lr * gamma ** ((step // max(1, steps_per_epoch)) // max(1, step_size))
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        t = min(step - warmup_steps, span)
        return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t / span))
    raise ConfigError(f"lr_schedule must be one of {SCHEDULES}, got {schedule!r}")


class Trainer:
    """Supervised classification trainer: cross-entropy, SGD or AdamW, LR set every iteration.

    Args:
        model: any ``nn.Module`` mapping a batch ``x`` to logits (N, num_classes). It is moved to
            ``device``; the optimizer is built once from ``model.parameters()`` (parametrizations
            registered later keep the same Parameter objects, so masks added by a pruner work).
        train_loader: an iterable of ``(x, y)`` batches with ``__len__`` (y: class indices, (N,)).
            If it has ``set_epoch(e)`` it is called before each epoch (deterministic shuffling);
            its ``state_dict``/``load_state_dict`` are saved and restored with checkpoints.
        eval_loader: optional loader evaluated at the end of each epoch.
        epochs: number of epochs (>= 1).
        optimizer: ``"sgd"`` (momentum, optional Nesterov) or ``"adamw"`` (Loshchilov & Hutter 2019).
        lr: peak learning rate; defaults to 0.1 for SGD and 1e-3 for AdamW.
        momentum, nesterov: SGD only (ignored by AdamW). weight_decay: coupled L2 for SGD,
            decoupled decay for AdamW; applied to all parameters.
        lr_schedule: ``"cosine"``, ``"step"`` or ``"constant"``, evaluated per step (:func:`lr_at_step`).
        step_size, gamma: for ``"step"``: multiply by ``gamma`` every ``step_size`` epochs
            (default ``max(1, epochs // 3)``).
        warmup_steps: linear warmup length in optimizer steps.
        label_smoothing: in [0, 1), for the training loss only (evaluation reports plain CE).
        callbacks: objects with any of ``on_train_begin(trainer)``, ``on_step_end(trainer)``
            (after ``optimizer.step()``, with ``global_step`` already incremented),
            ``on_epoch_end(trainer, metrics)``, ``on_train_end(trainer)``, ``extra_loss(trainer) ->
            Tensor | None`` (a penalty added to the task loss before backward, e.g. ADMM's
            ρ/2‖W−Z+U‖², FBS's saliency L1 or :class:`secateur.train.distill.Distillation`, which reads
            the current batch from ``trainer.batch_inputs`` / ``batch_logits``; the logged loss stays
            the task loss) and
            ``on_after_backward(trainer)`` (gradients present, before ``optimizer.step()``; e.g. to
            accumulate Taylor scores or add slimming's subgradient λ·sign(γ)); optional
            ``state_dict``/``load_state_dict`` go into checkpoints. A callback may set
            ``trainer.should_stop = True`` to end training after the current epoch.
        progress: show a tqdm bar with loss, accuracy and LR.
        log_every: add a ``"kind": "step"`` entry to ``history`` every this many steps (0: never).
        checkpoint_dir: if given, :meth:`save_checkpoint` is called there after every epoch: each
            save is a new complete ``ckpt-*`` folder published atomically (crash-safe; see
            :mod:`secateur.train.checkpoint`). In a distributed run only rank 0 writes.
        checkpoint_keep_last: complete checkpoints kept in ``checkpoint_dir`` (older ones are
            deleted after each new one is complete); ``None`` keeps all.

    Attributes:
        global_step: optimizer steps done.
        epoch: epochs completed.
        history: list of dicts with ``kind`` ("step" or "epoch"), ``step``, ``epoch``, ``loss``, ``lr``,
            ``train_accuracy`` and, for epoch entries, ``eval_accuracy``/``eval_loss`` (None without an
            eval loader) and timing.

    Raises:
        ConfigError: a bad argument (the message names it and the allowed values).
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: Iterable[Any],
        eval_loader: Iterable[Any] | None = None,
        *,
        epochs: int,
        optimizer: str = "sgd",
        lr: float | None = None,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 5e-4,
        lr_schedule: str = "cosine",
        step_size: int | None = None,
        gamma: float = 0.1,
        warmup_steps: int = 0,
        min_lr: float = 0.0,
        label_smoothing: float = 0.0,
        callbacks: Sequence[Any] = (),
        progress: bool = True,
        device: str | torch.device = "cpu",
        log_every: int = 50,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        checkpoint_keep_last: int | None = checkpoint.DEFAULT_KEEP_LAST,
    ) -> None:
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            raise ConfigError(f"Trainer: epochs must be an int >= 1, got {epochs!r}")
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"Trainer: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if lr_schedule not in SCHEDULES:
            raise ConfigError(f"Trainer: lr_schedule must be one of {SCHEDULES}, got {lr_schedule!r}")
        lr = (0.1 if optimizer == "sgd" else 1e-3) if lr is None else lr
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ConfigError(f"Trainer: lr must be a number > 0, got {lr!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"Trainer: label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if weight_decay < 0 or momentum < 0 or min_lr < 0 or warmup_steps < 0:
            raise ConfigError(
                "Trainer: weight_decay, momentum, min_lr and warmup_steps must be >= 0, got "
                f"{weight_decay!r}, {momentum!r}, {min_lr!r}, {warmup_steps!r}"
            )
        if step_size is not None and step_size < 1:
            raise ConfigError(f"Trainer: step_size (epochs) must be >= 1, got {step_size!r}")
        if log_every < 0:
            raise ConfigError(f"Trainer: log_every must be >= 0, got {log_every!r}")
        try:
            checkpoint.check_keep_last(checkpoint_keep_last)
        except ConfigError as exc:
            raise ConfigError(f"Trainer: checkpoint_{exc}") from None
        try:
            steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
        except TypeError as exc:
            raise ConfigError(
                "Trainer: train_loader must have __len__ (number of batches per epoch)"
            ) from exc
        if steps_per_epoch < 1:
            raise ConfigError("Trainer: train_loader is empty (len == 0)")
        for cb in callbacks:
            if not any(callable(getattr(cb, h, None)) for h in _CALLBACK_HOOKS):
                raise ConfigError(f"Trainer: callback {cb!r} has none of the methods {_CALLBACK_HOOKS}")

        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.train_loader = train_loader
        self.eval_loader = eval_loader
        self.epochs = epochs
        self.optimizer_name = optimizer
        self.base_lr = float(lr)
        self.lr_schedule = lr_schedule
        self.step_size = step_size if step_size is not None else max(1, epochs // 3)
        self.gamma = float(gamma)
        self.warmup_steps = int(warmup_steps)
        self.min_lr = float(min_lr)
        self.label_smoothing = float(label_smoothing)
        self.callbacks = list(callbacks)
        self.progress = progress
        self.log_every = int(log_every)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_keep_last = checkpoint_keep_last
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = epochs * steps_per_epoch
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("Trainer: the model has no trainable parameters")
        if optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=self.base_lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
            )
        else:
            self.optimizer = torch.optim.AdamW(params, lr=self.base_lr, weight_decay=weight_decay)
        self.global_step = 0
        self.batch_inputs: Any = None
        self.batch_logits: torch.Tensor | None = None
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.should_stop = False
        self._in_epoch = False

    # ----------------------------------------------------------------- schedule
    def lr_at(self, step: int) -> float:
        """Learning rate used for the optimizer step after ``step`` steps (see :func:`lr_at_step`)."""
        return lr_at_step(
            step,
            base_lr=self.base_lr,
            total_steps=self.total_steps,
            schedule=self.lr_schedule,
            steps_per_epoch=self.steps_per_epoch,
            step_size=self.step_size,
            gamma=self.gamma,
            warmup_steps=self.warmup_steps,
            min_lr=self.min_lr,
        )

    @property
    def lr(self) -> float:
        """Learning rate of the next optimizer step."""
        return self.lr_at(self.global_step)

    # ----------------------------------------------------------------- loop
    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if callable(fn):
                fn(self, *args)

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cpu":
            return x, y
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def fit(self, resume_from: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
        """Train from ``self.epoch`` up to ``epochs`` (or until a callback sets ``should_stop``).

        With ``resume_from``, first restore a checkpoint written by :meth:`save_checkpoint` (a
        checkpoint root: its newest complete checkpoint). Returns ``history``.

        Raises:
            SerializationError: ``resume_from`` is unreadable or does not fit this trainer.
        """
        if resume_from is not None:
            self.resume(resume_from)
        self.should_stop = False
        self._call("on_train_begin")
        while self.epoch < self.epochs and not self.should_stop:
            self._train_epoch()
        self._call("on_train_end")
        return self.history

    def _train_epoch(self) -> None:
        epoch = self.epoch
        if callable(getattr(self.train_loader, "set_epoch", None)):
            self.train_loader.set_epoch(epoch)  # type: ignore[attr-defined]
        self.model.train()
        criterion = nn.CrossEntropyLoss(label_smoothing=self.label_smoothing)
        loss_sum = correct = seen = 0.0
        win_loss = win_correct = win_seen = 0.0
        start = time.perf_counter()
        self._in_epoch = True
        # No tqdm object at all when the bar is off: even a disabled bar takes tqdm's lock, a
        # multiprocessing semaphore shared with a forking parent. A training child SIGKILLed while holding
        # it leaves the parent's next bar waiting forever (seen in tests/test_checkpoint_crash.py).
        bar = (
            tqdm(
                self.train_loader,
                total=self.steps_per_epoch,
                desc=f"epoch {epoch + 1}/{self.epochs}",
                leave=False,
                dynamic_ncols=True,
            )
            if self.progress
            else None
        )
        for x, y in self.train_loader if bar is None else bar:
            x, y = self._to_device(x, y)
            lr = self.lr_at(self.global_step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            logits = self.model(x)
            # the current batch, for callbacks whose extra_loss needs it (e.g. Distillation)
            self.batch_inputs, self.batch_logits = x, logits
            loss = criterion(logits, y)
            total = loss
            for cb in self.callbacks:
                extra_fn = getattr(cb, "extra_loss", None)
                extra = extra_fn(self) if callable(extra_fn) else None
                if extra is not None:
                    total = total + extra
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            self._call("on_after_backward")
            self.optimizer.step()
            self.global_step += 1
            with torch.no_grad():
                n = float(y.shape[0])
                batch_loss = float(loss.detach()) * n
                batch_correct = float((logits.detach().argmax(1) == y).sum())
            loss_sum, correct, seen = loss_sum + batch_loss, correct + batch_correct, seen + n
            win_loss, win_correct, win_seen = win_loss + batch_loss, win_correct + batch_correct, win_seen + n
            self.batch_inputs = self.batch_logits = None
            self._call("on_step_end")
            if self.log_every and self.global_step % self.log_every == 0:
                self.history.append(
                    {
                        "kind": "step",
                        "step": self.global_step,
                        "epoch": epoch,
                        "loss": win_loss / win_seen,
                        "lr": lr,
                        "train_accuracy": win_correct / win_seen,
                    }
                )
                win_loss = win_correct = win_seen = 0.0
            if bar is not None:
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}", lr=f"{lr:.3g}")
        if bar is not None:
            bar.close()
        self._in_epoch = False
        train_time = time.perf_counter() - start
        self.epoch = epoch + 1
        metrics: dict[str, Any] = {
            "kind": "epoch",
            "step": self.global_step,
            "epoch": self.epoch,
            "loss": loss_sum / max(seen, 1.0),
            "lr": self.lr_at(max(0, self.global_step - 1)),
            "train_accuracy": correct / max(seen, 1.0),
            "eval_accuracy": None,
            "eval_loss": None,
            "train_time_s": train_time,
            "images_per_s": seen / train_time if train_time > 0 else None,
        }
        if self.eval_loader is not None:
            result = self.evaluate(self.eval_loader)
            metrics["eval_accuracy"], metrics["eval_loss"] = result["accuracy"], result["loss"]
        self.history.append(metrics)
        if self.progress:
            ev = "" if metrics["eval_accuracy"] is None else f" eval_acc {metrics['eval_accuracy']:.4f}"
            tqdm.write(
                f"epoch {self.epoch}/{self.epochs}: loss {metrics['loss']:.4f} "
                f"train_acc {metrics['train_accuracy']:.4f}{ev} ({train_time:.1f}s)"
            )
        self._call("on_epoch_end", metrics)
        if self.checkpoint_dir is not None and is_main_process():
            self.save_checkpoint(self.checkpoint_dir)

    @torch.no_grad()
    def evaluate(self, loader: Iterable[Any]) -> dict[str, float]:
        """Top-1 accuracy (fraction in [0, 1]) and mean cross-entropy (nats per sample) on ``loader``.

        The model is put in eval mode and each module's own mode restored afterwards.

        Raises:
            ConfigError: ``loader`` yields no samples.
        """
        loss_sum = correct = seen = 0.0
        with eval_mode(self.model):
            for x, y in loader:
                x, y = self._to_device(x, y)
                logits = self.model(x)
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += float((logits.argmax(1) == y).sum())
                seen += y.shape[0]
        if seen == 0:
            raise ConfigError("Trainer.evaluate: the loader yielded no samples")
        return {"accuracy": correct / seen, "loss": loss_sum / seen}

    # ----------------------------------------------------------------- checkpoints
    def json_state(self) -> dict[str, Any]:
        """Counters, history and settings a checkpoint stores as JSON (:mod:`secateur.train.checkpoint`)."""
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "epochs": self.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "mid_epoch": self._in_epoch,
            "history": self.history,
            "rng": get_rng_state(),
            "schedule": {
                "name": self.lr_schedule,
                "base_lr": self.base_lr,
                "last_step": self.global_step,
                "total_steps": self.total_steps,
                "step_size": self.step_size,
                "gamma": self.gamma,
                "warmup_steps": self.warmup_steps,
                "min_lr": self.min_lr,
            },
            "config": {"optimizer": self.optimizer_name, "label_smoothing": self.label_smoothing},
        }

    def check_json_state(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint's JSON state that does not fit this trainer, before anything is changed.

        Raises:
            SerializationError: a missing field, or a state saved mid-epoch or with other settings.
        """
        try:
            epoch, step, epochs, spe = (
                state["epoch"],
                state["global_step"],
                state["epochs"],
                state["steps_per_epoch"],
            )
        except (KeyError, TypeError) as exc:
            raise SerializationError(f"checkpoint trainer state lacks field {exc}") from exc
        if state.get("mid_epoch"):
            raise SerializationError(
                f"checkpoint was saved in the middle of epoch {epoch + 1} (step {step}); "
                "only checkpoints taken at epoch ends can be resumed"
            )
        if epochs != self.epochs or spe != self.steps_per_epoch:
            warnings.warn(
                f"resuming a run planned for {epochs} epochs x {spe} steps with "
                f"{self.epochs} x {self.steps_per_epoch}: the LR schedule changes from here on",
                stacklevel=4,
            )

    def load_json_state(self, state: dict[str, Any]) -> None:
        """Restore counters and history from :meth:`json_state` (checked by :meth:`check_json_state`)."""
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        set_rng_state(state["rng"])

    def save_checkpoint(self, directory: str | os.PathLike[str]) -> Path:
        """Save model, optimizer, schedule position, history, callbacks and RNG as a new checkpoint.

        ``directory`` is a checkpoint root; the new complete folder ``ckpt-<n>-step-<s>`` inside
        it is returned, and complete checkpoints beyond ``checkpoint_keep_last`` are deleted.
        Crash-safe and pickle-free: see :mod:`secateur.train.checkpoint`.

        Raises:
            SerializationError: a callback or loader state cannot be stored without pickle.
        """
        return checkpoint.save_checkpoint(self, directory, keep_last=self.checkpoint_keep_last)

    def resume(self, directory: str | os.PathLike[str]) -> None:
        """Restore a checkpoint saved at an epoch end; the next :meth:`fit` continues from there.

        ``directory``: a checkpoint root (its newest complete checkpoint is used; unfinished saves
        are ignored) or one checkpoint folder.

        With the same seed, model construction and loaders, the final weights equal those of an
        uninterrupted run bit for bit (on CPU).

        Raises:
            SerializationError: unreadable, inconsistent or mid-epoch checkpoint, or one that does
                not fit this model, optimizer or callback list.
        """
        checkpoint.load_checkpoint(self, directory)
