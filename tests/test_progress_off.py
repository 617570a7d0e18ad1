"""With ``progress=False`` no tqdm object is built, so tqdm's lock is never taken.

Why it matters: even a *disabled* tqdm bar takes ``tqdm.get_lock()``, which holds a multiprocessing
semaphore shared with every forked relative. A training child SIGKILLed while it held that semaphore left
its parent's next progress bar waiting forever (the hang of the 1-thread suite in session 6, after
``tests/test_checkpoint_crash.py``). Here the lock is held by another thread, as a killed relative would
hold it, and training and distillation must still finish.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm import tqdm

from secateur.llm import distill
from secateur.train import Trainer
from test_llm_recovery import VOCAB, tiny_llama


@contextmanager
def _tqdm_lock_held_elsewhere() -> Iterator[None]:
    lock, held, release = tqdm.get_lock(), threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(10)
    try:
        yield
    finally:
        release.set()
        holder.join(10)


def _finishes(fn: Callable[[], None], within_s: float = 30.0) -> bool:
    done = threading.Event()

    def run() -> None:
        fn()
        done.set()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(within_s)  # with the bug, it waits for the lock until the holder lets go (60 s)
    return done.is_set()


def test_trainer_without_a_bar_never_waits_for_tqdms_lock() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(3)]
    trainer = Trainer(model, data, epochs=2, lr=0.05, progress=False, log_every=0)
    with _tqdm_lock_held_elsewhere():
        assert _finishes(trainer.fit)
    assert trainer.global_step == 6


def test_distill_without_a_bar_never_waits_for_tqdms_lock() -> None:
    teacher, student = tiny_llama(), tiny_llama()
    g = torch.Generator().manual_seed(0)
    cal = [{"input_ids": torch.randint(0, VOCAB, (2, 8), generator=g)} for _ in range(2)]
    reports = []
    with _tqdm_lock_held_elsewhere():
        assert _finishes(lambda: reports.append(distill(student, teacher, cal, steps=2, progress=False)))
    assert reports[0].steps == 2
