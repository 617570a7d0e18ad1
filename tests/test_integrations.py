"""Callbacks for the Hugging Face Trainer and PyTorch Lightning drive the pruner's schedule."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
from torch import nn

from secateur.pruners.element import Pruner
from secateur.schedules import Iterative

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCHEDULE = Iterative(sparsity=0.5, steps=3, every=2, start=0)  # updates at steps 0, 2, 4
EXPECTED_STEPS = [0, 2, 4]


class _Recorder:
    """Sparsity seen after every optimizer step (to check masks change only on schedule)."""

    def __init__(self, pruner: Pruner) -> None:
        self.pruner = pruner
        self.rows: list[tuple[int, float]] = []

    def record(self, step: int) -> None:
        self.rows.append((int(step), self.pruner.sparsity()))


def _check_schedule(rows: list[tuple[int, float]], updates: list[tuple[int, float]], pruner: Pruner) -> None:
    assert [s for s, _ in updates] == EXPECTED_STEPS
    targets = [SCHEDULE.sparsity_at(s) for s in EXPECTED_STEPS]
    for (_, got), want in zip(updates, targets):
        assert got == pytest.approx(want, abs=0.01)
    # Between updates the sparsity stays constant; it changes exactly at steps 2 and 4.
    changes = [rows[i][0] for i in range(1, len(rows)) if rows[i][1] != rows[i - 1][1]]
    assert changes == [2, 4]
    assert pruner.sparsity() == pytest.approx(0.5, abs=0.01)
    for mask in pruner.masks().values():
        assert mask.dtype == torch.bool


def test_hf_trainer_callback_drives_schedule(tmp_path) -> None:
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from secateur.integrations.hf_trainer import PruningCallback

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    model = BertForSequenceClassification(config)
    pruner = Pruner(model, SCHEDULE)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (24, 8), generator=g)
    ones = torch.ones(8, dtype=torch.long)
    data = [{"input_ids": ids[i], "attention_mask": ones, "labels": int(ids[i, 0] % 2)} for i in range(24)]
    recorder = _Recorder(pruner)
    grads: list[bool] = []  # forwarded before each optimizer step, with gradients present
    pruner.on_after_backward = lambda _t: grads.append(all(p.grad is not None for p in model.parameters()))

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            recorder.record(state.global_step)

    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", max_steps=6,
        per_device_train_batch_size=4, learning_rate=1e-3, logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )
    callback = PruningCallback(pruner)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback, Record()])
    trainer.train()
    assert trainer.state.global_step == 6
    assert grads == [True] * 6
    recorder.rows.insert(0, (0, callback.updates[0][1]))
    _check_schedule(recorder.rows, callback.updates, pruner)
    # The masked weights really are zero in the trained model.
    w = model.bert.encoder.layer[0].intermediate.dense.weight
    assert float((w == 0).float().mean()) > 0.2


def test_lightning_callback_drives_schedule(tmp_path) -> None:
    pl = pytest.importorskip("lightning.pytorch", reason="Lightning not installed (pip install lightning)")
    from torch.utils.data import DataLoader, TensorDataset

    from secateur.integrations.lightning import PruningCallback

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    pruner = Pruner(net, SCHEDULE)
    recorder = _Recorder(pruner)
    grads: list[bool] = []  # forwarded before each optimizer step, with gradients present
    pruner.on_after_backward = lambda _t: grads.append(all(p.grad is not None for p in net.parameters()))

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            recorder.record(trainer.global_step)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 8, generator=g)
    loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)
    callback = PruningCallback(pruner)
    trainer = pl.Trainer(
        max_steps=6, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
        callbacks=[callback, Record()],
    )
    trainer.fit(Module(), loader)
    assert trainer.global_step == 6
    assert grads == [True] * 6
    recorder.rows.insert(0, (0, callback.updates[0][1]))
    _check_schedule(recorder.rows, callback.updates, pruner)
    assert callback.state_dict()["last_update"] == 4


def test_lightning_module_imports_without_lightning_class_access() -> None:
    import secateur.integrations.lightning as mod

    with pytest.raises(AttributeError):
        mod.NotThere  # noqa: B018


class _CountingPruner:
    """A pruner stand-in whose masks change at even steps; no ``sparsity()`` method."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def step(self, step: int) -> bool:
        self.calls.append(step)
        return step % 2 == 0


def test_callbacks_share_one_stepping_base() -> None:
    """Both framework callbacks step through PrunerStepping: same calls, same records."""
    from secateur.integrations._stepping import PrunerStepping

    classes = []
    if importlib.util.find_spec("transformers") is not None:
        from secateur.integrations.hf_trainer import PruningCallback as HF

        classes.append(HF)
    if importlib.util.find_spec("lightning") is not None:
        from secateur.integrations.lightning import PruningCallback as PL

        classes.append(PL)
    if not classes:
        pytest.skip("neither transformers nor Lightning installed")
    for cls in classes:
        assert issubclass(cls, PrunerStepping) and "_step" not in vars(cls)
        pruner = _CountingPruner()
        cb = cls(pruner, sync=True)  # no process group: sync is a no-op
        for s in range(5):
            cb._step(s)
        assert pruner.calls == [0, 1, 2, 3, 4]
        steps = [s for s, _ in cb.updates]
        assert steps == [0, 2, 4] and all(math.isnan(v) for _, v in cb.updates)
