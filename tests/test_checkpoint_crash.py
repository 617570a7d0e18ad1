"""Crash-safe checkpoints: SIGKILL at random moments (inside writes too), partial saves, corruption.

The kill test forks a child that trains a small MLP with a checkpoint after every step (one
batch per epoch) and resumes from the same folder; the parent SIGKILLs it 20 times (seeded). Half
of the kills are aimed: the child freezes just before a randomly chosen file operation of a save
(a file write, a directory fsync, the publishing rename, the deletion of an old checkpoint) and is
killed there. The other half land at a random delay after the child's first save began. After every
kill the newest complete checkpoint must load and equal, bit for bit, the uninterrupted run at its
step; every ``ckpt-*`` folder must verify; an unfinished folder is never picked.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import secateur.train.checkpoint as ck
from secateur.errors import ConfigError, SerializationError
from secateur.train import Trainer
from secateur.train.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint, verify_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

EPOCHS = 100_000  # the child trains until killed
KEEP = 2
KILLS = 20


class StepSum:
    """A stateful callback with a tensor in its state (so saves also write ``extra.safetensors``)."""

    def __init__(self) -> None:
        self.total = torch.zeros(3, dtype=torch.float64)

    def on_step_end(self, trainer: Trainer) -> None:
        self.total += trainer.global_step

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = state["total"].clone()


class Record:
    """Copies of the trainer's state after every epoch (= step); stops at ``stop``."""

    def __init__(self, stop: int) -> None:
        self.stop, self.states = stop, {}

    def on_epoch_end(self, trainer: Trainer, metrics: dict) -> None:
        self.states[trainer.global_step] = _snapshot(trainer)
        trainer.should_stop = trainer.global_step >= self.stop


def _trainer(checkpoint_dir: Path | None, extra_callbacks: tuple = ()) -> Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    return Trainer(
        model,
        [(x, y)],
        epochs=EPOCHS,
        lr=0.05,
        lr_schedule="constant",
        callbacks=[StepSum(), *extra_callbacks],
        progress=False,
        log_every=0,
        checkpoint_dir=checkpoint_dir,
        checkpoint_keep_last=KEEP,
    )


def _snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.clone() for k, v in trainer.model.state_dict().items()}
    for i, st in trainer.optimizer.state_dict()["state"].items():
        out[f"momentum.{i}"] = st["momentum_buffer"].clone()
    out["callback"] = trainer.callbacks[0].total.clone()
    return out


# Order of the instrumented operations within one save (keep_last reached):
OPS = (
    "write model",
    "write optimizer",
    "write extra",
    "write state",
    "write marker",
    "fsync partial folder",
    "rename to ckpt-*",
    "fsync root",
    "discard old",
    "fsync root (discard)",
)
MID_WRITE_OPS = 7  # ops 0-6 are before the publishing rename: the save is still a .partial folder


def _instrument(freeze: tuple[int, int] | None, frozen: Any, saving: Any) -> None:
    """In the child: signal ``saving`` at the first file operation of the first save; with ``freeze =
    (save_no, op_no)``, stop just before operation ``op_no`` of the ``save_no``-th save, and signal."""
    count = {"save": 0, "op": -1}

    def wrap(fn: Any) -> Any:
        def inner(*args: Any, **kwargs: Any) -> Any:
            if fn.__name__ == "_write_file" and Path(args[0]).name == ck.MODEL_FILE:
                count["save"], count["op"] = count["save"] + 1, -1
            count["op"] += 1
            saving.set()
            if (count["save"], count["op"]) == freeze:
                frozen.set()
                time.sleep(120)  # killed here
            return fn(*args, **kwargs)

        return inner

    for name in ("_write_file", "_fsync_dir", "_publish", "_discard"):
        setattr(ck, name, wrap(getattr(ck, name)))


def _child(root: str, freeze: tuple[int, int] | None, frozen: Any, saving: Any) -> None:
    torch.set_num_threads(1)
    _instrument(freeze, frozen, saving)
    _trainer(Path(root)).fit(resume_from=root)


def _check_folder(root: Path) -> str:
    """Invariants after a kill; returns what the kill interrupted ("mid-write", "mid-delete", "between")."""
    names = sorted(p.name for p in root.iterdir())
    published = list_checkpoints(root)
    assert published and all(p.name.startswith("ckpt-") for p in published), names
    for p in published:  # every ckpt-* folder is complete: marker present, sizes and digests match
        verify_checkpoint(p)
    for p in root.glob(ck.PARTIAL_PREFIX + "*"):
        # An unfinished save is never picked; if its marker was fully written, the marker is true.
        try:
            verify_checkpoint(p)
        except SerializationError:
            pass
        assert p not in published
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no published folder is skipped as broken
        assert latest_checkpoint(root) == published[-1]
    assert len(published) <= KEEP + 1  # one more only when killed between publish and delete
    if any(n.startswith(ck.PARTIAL_PREFIX) for n in names):
        return "mid-write"
    if any(n.startswith(ck.TRASH_PREFIX) for n in names) or len(published) > KEEP:
        return "mid-delete"
    return "between"


@pytest.mark.skipif("forkserver" not in mp.get_all_start_methods(), reason="needs forkserver")
def test_sigkill_at_random_moments_always_leaves_a_complete_checkpoint(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    root = tmp_path / "ckpts"
    _trainer(None).save_checkpoint(root)  # step 0
    # Children fork from a fresh single-threaded server, not from pytest: a plain fork copies whatever
    # locks the suite's other threads (e.g. tqdm's monitor) hold at that moment, and shares tqdm's
    # multiprocessing lock with the parent. The server imports this module and torch._dynamo (which
    # the first optimizer step imports, 1.3 s) once, so a child starts in ~35 ms.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "torch._dynamo"])
    rng = random.Random(12)
    restored: list[tuple[int, dict[str, torch.Tensor]]] = []
    kinds: dict[str, int] = {}
    aimed_mid_write = 0
    children: list = []  # killed whatever fails: a frozen forked child must not outlive the test
    try:
        for kill in range(KILLS):
            frozen, saving = ctx.Event(), ctx.Event()
            freeze = (rng.choice((2, 3)), rng.randrange(len(OPS))) if kill % 2 == 0 else None
            delay = rng.uniform(0.02, 0.6)
            child = ctx.Process(target=_child, args=(str(root), freeze, frozen, saving), daemon=True)
            child.start()
            children.append(child)
            deadline = time.monotonic() + 60
            awaited = saving if freeze is None else frozen
            while not awaited.wait(0.02):
                assert child.is_alive() and time.monotonic() < deadline, (
                    "the child died or never began a save"
                    if freeze is None
                    else f"the child died or never reached {OPS[freeze[1]]} of save {freeze[0]}"
                )
            if freeze is None:  # a random moment once training runs (start-up and resume take longer
                time.sleep(delay)  # on a loaded machine, and a kill there only interrupts reads)
            else:
                aimed_mid_write += freeze[1] < MID_WRITE_OPS
            child.kill()  # SIGKILL
            child.join(10)
            assert child.exitcode == -9, child.exitcode
            kind = _check_folder(root)
            kinds[kind] = kinds.get(kind, 0) + 1
            trainer = _trainer(None)
            trainer.resume(root)  # always succeeds, from the newest complete checkpoint
            step = trainer.global_step
            assert not restored or step >= restored[-1][0]  # never loses a completed save
            marker = json.loads((latest_checkpoint(root) / ck.MARKER_FILE).read_text())
            assert marker["global_step"] == step
            restored.append((step, _snapshot(trainer)))
    finally:
        for c in children:
            if c.is_alive():
                c.kill()
    # The uninterrupted run, recorded after every step, equals every restored checkpoint bit for bit.
    last = restored[-1][0]
    assert last >= 10, restored  # the children did make progress
    rec = Record(stop=last)
    _trainer(None, (rec,)).fit()
    rec.states[0] = _snapshot(_trainer(None))
    for step, got in restored:
        want = rec.states[step]
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in got), step
    # The next save removes every unfinished folder and keeps KEEP complete checkpoints.
    resumed = _trainer(root)
    resumed.resume(root)
    resumed.save_checkpoint(root)
    assert all(p.name.startswith("ckpt-") for p in root.iterdir())
    assert len(list_checkpoints(root)) == KEEP
    assert kinds.get("mid-write", 0) >= aimed_mid_write >= 3, kinds
    print(
        f"\n{KILLS} SIGKILLs: {kinds} ({aimed_mid_write} aimed inside a write); restored steps "
        f"{[s for s, _ in restored]}; {time.perf_counter() - t0:.1f} s"
    )


# ----------------------------------------------------------------------------- layout details
def test_keep_last_deletes_only_older_complete_checkpoints(tmp_path: Path) -> None:
    trainer = _trainer(None)
    paths = []
    for _ in range(4):
        trainer.global_step += 1
        paths.append(save_checkpoint(trainer, tmp_path, keep_last=2))
    assert [p.name for p in paths] == [f"ckpt-00000{i}-step-{i}" for i in range(1, 5)]
    assert list_checkpoints(tmp_path) == paths[2:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths[2:]]
    save_checkpoint(trainer, tmp_path, keep_last=None)
    assert len(list_checkpoints(tmp_path)) == 3
    with pytest.raises(ConfigError, match="keep_last"):
        save_checkpoint(trainer, tmp_path, keep_last=0)
    batch = [(torch.zeros(1, 2), torch.zeros(1).long())]
    with pytest.raises(ConfigError, match="checkpoint_keep_last"):
        Trainer(nn.Linear(2, 2), batch, epochs=1, checkpoint_keep_last=0)


def test_unfinished_saves_are_ignored_then_cleaned(tmp_path: Path) -> None:
    trainer = _trainer(None)
    good = save_checkpoint(trainer, tmp_path)
    # A save killed just before its rename: every file and even its marker are there.
    trainer.global_step = 7
    done = save_checkpoint(trainer, tmp_path / "elsewhere")
    partial = tmp_path / f"{ck.PARTIAL_PREFIX}000002-0123456789ab"
    done.rename(partial)
    legacy_tmp = tmp_path / ".model.safetensors.tmp-4242"  # left by the first layout's writer
    legacy_tmp.write_bytes(b"x")
    fresh = _trainer(None)
    fresh.resume(tmp_path)
    assert fresh.global_step == 0  # the complete one, not the unfinished step-7 save
    with pytest.raises(SerializationError, match="unfinished save"):
        fresh.resume(partial)
    assert partial.exists() and legacy_tmp.exists()  # loading never changes the folder
    nxt = save_checkpoint(trainer, tmp_path)
    assert nxt.name == "ckpt-000002-step-7"
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name, nxt.name, "elsewhere"]
    # Only unfinished saves: a clear error that names them.
    only = tmp_path / "only"
    only.mkdir()
    (only / f"{ck.PARTIAL_PREFIX}000001-ffffffffffff").mkdir()
    with pytest.raises(SerializationError, match=r"no complete checkpoint.*unfinished saves ignored"):
        fresh.resume(only)


def test_corrupted_newest_checkpoint_falls_back_with_a_warning(tmp_path: Path) -> None:
    trainer = _trainer(None)
    first = save_checkpoint(trainer, tmp_path)
    trainer.global_step = 3
    newest = save_checkpoint(trainer, tmp_path)
    data = (newest / ck.MODEL_FILE).read_bytes()
    (newest / ck.MODEL_FILE).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*ckpt-000002.*SHA-256"):
        assert latest_checkpoint(tmp_path) == first
    with pytest.raises(SerializationError, match="SHA-256"):
        verify_checkpoint(newest)
    assert verify_checkpoint(newest, digests=False)["global_step"] == 3  # same size: only the digest sees it
    (newest / ck.MODEL_FILE).write_bytes(data)
    (newest / ck.STATE_FILE).unlink()
    with pytest.raises(SerializationError, match="state.json is missing"):
        verify_checkpoint(newest)
    (newest / ck.MARKER_FILE).unlink()
    with pytest.raises(SerializationError, match="complete.json is missing"):
        _trainer(None).resume(newest)


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_save_leaves_previous_checkpoint_and_no_partial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    trainer = _trainer(None)
    good = save_checkpoint(trainer, tmp_path)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    real = ck._write_file

    def failing(path: Path, data: bytes) -> dict:
        if path.name == ck.STATE_FILE:
            raise exc
        return real(path, data)

    monkeypatch.setattr(ck, "_write_file", failing)
    trainer.global_step = 5
    with pytest.raises(type(exc)):
        save_checkpoint(trainer, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [good.name]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
