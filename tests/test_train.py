"""Tests of the trainer: learning, LR schedules, callbacks, pickle-free checkpoints, exact resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset

from secateur.errors import ConfigError, SerializationError
from secateur.train import Trainer, lr_at_step, read_state, seed_everything
from secateur.train.checkpoint import latest_checkpoint, list_checkpoints
from secateur.zoo import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyLoader:
    """In-memory batches with per-epoch deterministic shuffling (like the project's TensorLoader)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0) -> None:
        self.x, self.y, self.batch_size, self.seed, self.epoch = x, y, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.epoch = state["seed"], state["epoch"]

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(len(self.x), generator=g)
        for i in range(0, len(order), self.batch_size):
            idx = order[i : i + self.batch_size]
            yield self.x[idx], self.y[idx]


def toy_data(n: int = 96, num_classes: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable task: the label says whether the top or the bottom half of the image is brighter."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g)
    y = (x[:, 0, :14].mean(dim=(1, 2)) < x[:, 0, 14:].mean(dim=(1, 2))).long()
    x[:, 0, 14:] += 0.3 * (2 * y.float() - 1).view(-1, 1, 1)  # widen the margin
    return x, y % num_classes


def small_resnet() -> nn.Module:
    return create_model("resnet8", num_classes=2, width=0.25, stem_stride=2)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_train_begin(self, trainer: Trainer) -> None:
        self.events.append(("begin", trainer.global_step, trainer.epoch))

    def on_step_end(self, trainer: Trainer) -> None:
        self.events.append(("step", trainer.global_step, trainer.optimizer.param_groups[0]["lr"]))

    def on_epoch_end(self, trainer: Trainer, metrics: dict) -> None:
        self.events.append(("epoch", trainer.global_step, metrics["epoch"], metrics["eval_accuracy"]))

    def on_train_end(self, trainer: Trainer) -> None:
        self.events.append(("end", trainer.global_step, trainer.epoch))


class StopAfter:
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_epoch_end(self, trainer: Trainer, metrics: dict) -> None:
        if trainer.epoch >= self.epochs:
            trainer.should_stop = True


class Counter:
    """A stateful callback with a tensor in its state (goes to extra.safetensors)."""

    def __init__(self) -> None:
        self.steps = 0
        self.trace = torch.zeros(3)

    def on_step_end(self, trainer: Trainer) -> None:
        self.steps += 1
        self.trace += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "trace": self.trace.clone(), "tags": ("a", 1)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert state["tags"] == ("a", 1)
        self.steps, self.trace = state["steps"], state["trace"].clone()


def test_loss_decreases_on_learnable_task() -> None:
    seed_everything(0)
    x, y = toy_data(256)
    model = create_model("lenet5", num_classes=2)
    trainer = Trainer(
        model,
        TinyLoader(x, y, 32),
        TinyLoader(x, y, 64),
        epochs=6,
        optimizer="adamw",
        lr=3e-3,
        weight_decay=0.0,
        progress=False,
        log_every=4,
    )
    history = trainer.fit()
    epochs = [h for h in history if h["kind"] == "epoch"]
    assert len(epochs) == 6 and trainer.global_step == 6 * 8 and trainer.epoch == 6
    assert epochs[-1]["loss"] < 0.5 * epochs[0]["loss"]
    assert epochs[-1]["eval_accuracy"] > 0.9
    result = trainer.evaluate(TinyLoader(x, y, 50))
    assert set(result) == {"accuracy", "loss"} and 0.0 <= result["accuracy"] <= 1.0
    assert result["accuracy"] == pytest.approx(epochs[-1]["eval_accuracy"])
    steps = [h for h in history if h["kind"] == "step"]
    assert [h["step"] for h in steps] == list(range(4, 49, 4))
    assert all({"step", "epoch", "loss", "lr", "train_accuracy"} <= set(h) for h in steps)
    json.dumps(history)  # a report can store it as is


def test_cosine_lr_per_step_matches_formula() -> None:
    seed_everything(0)
    x, y = toy_data(40)
    rec = Recorder()
    trainer = Trainer(small_resnet(), TinyLoader(x, y, 8), epochs=2, lr=0.2, callbacks=[rec], progress=False)
    trainer.fit()
    used = [e[2] for e in rec.events if e[0] == "step"]
    total = 2 * 5
    assert len(used) == total
    for t, lr in enumerate(used):
        assert lr == pytest.approx(0.5 * 0.2 * (1 + math.cos(math.pi * t / total)), abs=1e-12)
    assert used[0] == 0.2 and trainer.lr == pytest.approx(0.0, abs=1e-12)


def test_other_schedules() -> None:
    kw = {"base_lr": 1.0, "total_steps": 100, "steps_per_epoch": 10}
    assert [lr_at_step(s, schedule="constant", **kw) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    step = [lr_at_step(s, schedule="step", step_size=3, gamma=0.5, **kw) for s in (0, 29, 30, 59, 60)]
    assert step == [1.0, 1.0, 0.5, 0.5, 0.25]
    warm = [lr_at_step(s, schedule="cosine", warmup_steps=4, **kw) for s in range(5)]
    assert warm == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_at_step(52, schedule="cosine", warmup_steps=4, **kw) == pytest.approx(0.5)
    assert lr_at_step(50, schedule="cosine", min_lr=0.1, **kw) == pytest.approx(0.55)


def test_callbacks_called_in_order_with_step_counts() -> None:
    seed_everything(0)
    x, y = toy_data(24)
    rec = Recorder()
    trainer = Trainer(
        small_resnet(), TinyLoader(x, y, 8), TinyLoader(x, y, 12), epochs=2, callbacks=[rec], progress=False
    )
    trainer.fit()
    kinds = [e[0] for e in rec.events]
    assert kinds == ["begin", "step", "step", "step", "epoch", "step", "step", "step", "epoch", "end"]
    assert [e[1] for e in rec.events] == [0, 1, 2, 3, 3, 4, 5, 6, 6, 6]
    assert rec.events[4][2] == 1 and rec.events[8][2] == 2
    assert all(0.0 <= e[3] <= 1.0 for e in rec.events if e[0] == "epoch")


def _run(
    tmp: Path | None,
    loader_kind: str,
    stop_after: int | None = None,
    resume: Path | None = None,
    epochs: int = 3,
    optimizer: str = "sgd",
) -> Trainer:
    seed_everything(123)
    model = small_resnet()
    x, y = toy_data(40, seed=1)
    if loader_kind == "tiny":
        loader: Any = TinyLoader(x, y, 8, seed=5)
    else:
        loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    callbacks: list[Any] = [Counter()]
    if stop_after is not None:
        callbacks.append(StopAfter(stop_after))
    trainer = Trainer(
        model,
        loader,
        epochs=epochs,
        optimizer=optimizer,
        lr=0.05 if optimizer == "sgd" else 3e-3,
        momentum=0.9,
        callbacks=callbacks,
        progress=False,
        log_every=2,
    )
    trainer.fit(resume_from=resume)
    if tmp is not None:
        trainer.save_checkpoint(tmp)
    return trainer


@pytest.mark.parametrize(("loader_kind", "optimizer"), [("tiny", "sgd"), ("torch", "sgd"), ("tiny", "adamw")])
def test_resume_is_bitwise_identical(tmp_path: Path, loader_kind: str, optimizer: str) -> None:
    """Stop after epoch 1 of 3, resume in a fresh trainer: same weights, optimizer state, history."""
    full = _run(None, loader_kind, optimizer=optimizer)
    stopped = _run(tmp_path / "ck", loader_kind, stop_after=1, optimizer=optimizer)
    assert stopped.epoch == 1 and stopped.global_step == 5
    # the stopped run really differs from the final one, so equality below is meaningful
    assert not torch.equal(stopped.model.fc.weight, full.model.fc.weight)
    resumed = _run(None, loader_kind, resume=tmp_path / "ck", optimizer=optimizer)
    assert resumed.epoch == 3 and resumed.global_step == full.global_step == 15
    for (k, a), (k2, b) in zip(
        full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(a, b), k
    opt_a, opt_b = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert opt_a.keys() == opt_b.keys() and opt_a
    for i in opt_a:
        assert opt_a[i].keys() == opt_b[i].keys()
        for name in opt_a[i]:  # momentum_buffer for SGD; step, exp_avg, exp_avg_sq for AdamW
            assert torch.equal(opt_a[i][name], opt_b[i][name]), (i, name)
    cb_a, cb_b = full.callbacks[0], resumed.callbacks[0]
    assert cb_a.steps == cb_b.steps == 15 and torch.equal(cb_a.trace, cb_b.trace)

    def strip(h: list[dict]) -> list[dict]:
        return [{k: v for k, v in e.items() if k not in ("train_time_s", "images_per_s")} for e in h]

    assert strip(full.history) == strip(resumed.history)


def test_checkpoint_has_no_pickle(tmp_path: Path) -> None:
    trainer = _run(tmp_path, "tiny", epochs=1)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000001-step-5"]
    ck = latest_checkpoint(tmp_path)
    assert ck == tmp_path / "ckpt-000001-step-5"
    names = sorted(p.name for p in ck.iterdir())
    assert names == [
        "complete.json",
        "extra.safetensors",
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]
    state = json.loads((ck / "state.json").read_text())
    assert state["trainer"]["global_step"] == 5 and state["model_zoo"]["name"] == "resnet8"
    assert read_state(tmp_path)["checkpoint_id"] == state["checkpoint_id"] == read_state(ck)["checkpoint_id"]
    marker = json.loads((ck / "complete.json").read_text())
    assert marker["checkpoint_id"] == state["checkpoint_id"] and marker["global_step"] == 5
    assert set(marker["files"]) == set(names) - {"complete.json"}
    model = load_file(str(ck / "model.safetensors"))
    assert model.keys() == trainer.model.state_dict().keys()
    assert load_file(str(ck / "optimizer.safetensors"))
    assert load_file(str(ck / "extra.safetensors"))
    for f in ck.iterdir():
        data = f.read_bytes()
        assert not data.startswith(b"\x80") and b"PK\x03\x04" not in data[:4]  # pickle / torch.save zip


def test_mixed_or_mid_epoch_checkpoints_are_refused(tmp_path: Path) -> None:
    _run(tmp_path / "a", "tiny", epochs=1)
    _run(tmp_path / "b", "tiny", epochs=1)
    a, b = latest_checkpoint(tmp_path / "a"), latest_checkpoint(tmp_path / "b")
    flat = tmp_path / "flat"  # the first layout: files directly in the folder, no marker
    shutil.copytree(b, flat)
    (flat / "complete.json").unlink()
    # A file copied in from another save (same size): the marker's SHA-256 no longer matches.
    shutil.copy(b / "model.safetensors", a / "model.safetensors")
    with pytest.raises(SerializationError, match="SHA-256"):
        _run(None, "tiny", resume=a, epochs=1)
    with pytest.warns(UserWarning, match="skipping checkpoint"), pytest.raises(
        SerializationError, match="no complete checkpoint"
    ):
        _run(None, "tiny", resume=tmp_path / "a", epochs=1)
    # Without a marker the checkpoint_id catches it.
    _run(None, "tiny", resume=flat, epochs=1)  # a consistent flat folder still loads
    shutil.copy(a / "optimizer.safetensors", flat / "optimizer.safetensors")
    with pytest.raises(SerializationError, match="checkpoint_id"):
        _run(None, "tiny", resume=flat, epochs=1)

    class SaveMidEpoch:
        def on_step_end(self, trainer: Trainer) -> None:
            if trainer.global_step == 2:
                trainer.save_checkpoint(tmp_path / "mid")

    seed_everything(0)
    x, y = toy_data(24)
    Trainer(small_resnet(), TinyLoader(x, y, 8), epochs=1, callbacks=[SaveMidEpoch()], progress=False).fit()
    fresh = Trainer(small_resnet(), TinyLoader(x, y, 8), epochs=1, progress=False)
    with pytest.raises(SerializationError, match="middle of epoch"):
        fresh.resume(tmp_path / "mid")
    with pytest.raises(SerializationError, match="not valid JSON"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "state.json").write_text("{")
        fresh.resume(tmp_path / "bad")


class MaskWeight(nn.Module):
    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(shape))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


class MaskingPruner:
    """Registers a mask parametrization at train begin and prunes more every step (like a pruner)."""

    def __init__(self) -> None:
        self.registered = False

    def on_train_begin(self, trainer: Trainer) -> None:
        conv = trainer.model.conv1
        if not parametrize.is_parametrized(conv, "weight"):
            parametrize.register_parametrization(conv, "weight", MaskWeight(conv.weight.shape))

    def on_step_end(self, trainer: Trainer) -> None:
        mask = trainer.model.conv1.parametrizations.weight[0].mask
        mask.view(-1)[: trainer.global_step] = 0.0


def test_parametrized_pruner_callback(tmp_path: Path) -> None:
    seed_everything(0)
    x, y = toy_data(24)
    model = small_resnet()
    original = model.conv1.weight
    trainer = Trainer(
        model,
        TinyLoader(x, y, 8),
        epochs=2,
        callbacks=[MaskingPruner()],
        progress=False,
        checkpoint_dir=tmp_path,
    )
    trainer.fit()
    assert model.conv1.parametrizations.weight.original is original  # the optimizer's Parameter is kept
    assert (model.conv1.weight.view(-1)[:6] == 0).all()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000001-step-3", "ckpt-000002-step-6"]
    keys = load_file(str(latest_checkpoint(tmp_path) / "model.safetensors")).keys()
    assert "conv1.parametrizations.weight.original" in keys and "conv1.parametrizations.weight.0.mask" in keys


def test_bad_arguments_raise_config_error() -> None:
    x, y = toy_data(8)
    loader = TinyLoader(x, y, 4)
    model = small_resnet()
    with pytest.raises(ConfigError, match="epochs"):
        Trainer(model, loader, epochs=0)
    with pytest.raises(ConfigError, match="optimizer.*sgd"):
        Trainer(model, loader, epochs=1, optimizer="adam")
    with pytest.raises(ConfigError, match="lr_schedule.*cosine"):
        Trainer(model, loader, epochs=1, lr_schedule="linear")
    with pytest.raises(ConfigError, match="__len__"):
        Trainer(model, iter([(x, y)]), epochs=1)
    with pytest.raises(ConfigError, match="callback"):
        Trainer(model, loader, epochs=1, callbacks=[object()])
    with pytest.raises(ConfigError, match="seed"):
        seed_everything(-1)


def test_extra_loss_and_after_backward_hooks():
    """A callback's penalty joins the backward pass; on_after_backward sees the gradients."""
    import torch as _torch

    from secateur.train import Trainer as _Trainer

    _torch.manual_seed(0)
    x, y = _torch.randn(32, 4), _torch.randint(0, 2, (32,))

    class _Loader:
        def __len__(self):
            return 1

        def __iter__(self):
            yield x, y

    def run(callbacks):
        _torch.manual_seed(0)
        model = _torch.nn.Linear(4, 2)
        _Trainer(
            model,
            _Loader(),
            epochs=1,
            lr=0.1,
            momentum=0.0,
            weight_decay=0.0,
            callbacks=callbacks,
            progress=False,
        ).fit()
        return model

    lam = 0.5

    class Penalty:
        def __init__(self):
            self.grads = []

        def extra_loss(self, trainer):
            return lam * trainer.model.weight.abs().sum()

        def on_after_backward(self, trainer):
            self.grads.append(trainer.model.weight.grad.clone())

    plain = run([])
    pen = Penalty()
    penalised = run([pen])
    # One SGD step at lr 0.1: the penalty adds lr * lam * sign(w0) to the update.
    _torch.manual_seed(0)
    w0 = _torch.nn.Linear(4, 2).weight.detach()
    expected = plain.weight.detach() - 0.1 * lam * _torch.sign(w0)
    assert _torch.allclose(penalised.weight.detach(), expected, atol=1e-6)
    assert len(pen.grads) == 1 and pen.grads[0].shape == w0.shape
