"""Transactions that survive any exception: every change is undone, bit-identical, or none was made.

:class:`Journal` is the undo log (each change recorded *before* it is made); :func:`restoring` runs a block
and, on any ``BaseException`` (``KeyboardInterrupt``, ``SystemExit`` and ``GeneratorExit`` included), calls
a restore function with Ctrl-C held by :func:`interrupts_deferred`, then re-raises the exception unchanged.
Used by compaction (:func:`secateur.compact.apply.compact`) and by every other transaction of the library
(pruners, LLM surgery, methods).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["Journal", "interrupts_deferred", "restoring"]


class Journal:
    """The undo log of one transaction: every change is recorded *before* it is made, so that
    :meth:`rollback` restores the state exactly whichever instruction an exception (or a
    ``KeyboardInterrupt``) interrupts. Restoring a change that had not happened yet is harmless: each
    entry puts back the value read before the change.

    Entries: a tensor's ``.data`` (:meth:`set_data`; the old tensor itself is kept, so the restore is
    bit-identical and costs no copy), an attribute (:meth:`set_attr`; module sizes, config keys) or any
    change with its own undo function (:meth:`record`).
    """

    def __init__(self) -> None:
        self.steps: list = []
        self.old_shape: dict[int, tuple[int, ...]] = {}

    def set_data(self, t: torch.Tensor, new: torch.Tensor) -> None:
        """``t.data = new``, journaled."""
        self.old_shape.setdefault(id(t), tuple(t.shape))
        self.steps.append(("data", t, t.data))
        t.data = new

    def record(self, restore: Callable[[], None]) -> None:
        """Journal an arbitrary change: ``restore()`` undoes it (and must be harmless if it did not
        happen)."""
        self.steps.append(("call", restore))

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """``setattr(obj, name, value)``, journaled (the instance attribute, or its absence, is restored)."""
        d = getattr(obj, "__dict__", None)
        had = d is not None and name in d
        self.steps.append(("attr", obj, name, getattr(obj, name, None), had))
        setattr(obj, name, value)

    def rollback(self) -> None:
        """Undo every journaled change, newest first; a SIGINT arriving meanwhile is held until the end
        (:func:`interrupts_deferred`). The journal is empty afterwards."""
        with interrupts_deferred():
            for step in reversed(self.steps):
                if step[0] == "data":
                    step[1].data = step[2]
                elif step[0] == "call":
                    step[1]()
                else:
                    _restore_attr(*step[1:])
            self.steps.clear()


def _restore_attr(obj: Any, name: str, old: Any, had: bool) -> None:
    d = getattr(obj, "__dict__", None)
    if had:
        setattr(obj, name, old)
    elif d is not None and name in d:  # an instance attribute the transaction added: remove it
        try:
            delattr(obj, name)
        except AttributeError:
            setattr(obj, name, old)
    elif getattr(obj, name, None) is not old:  # a property or slot: set the old value back through it
        setattr(obj, name, old)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT (Ctrl-C) for the duration of the block, then honour it as the handler in force would have:
    a restore that must run to completion is not cut in half by a second Ctrl-C.

    After the block the previous handler is put back and, if a SIGINT arrived meanwhile, it takes effect
    then: a Python handler is called (``signal.default_int_handler`` raises ``KeyboardInterrupt``);
    ``SIG_DFL`` (the OS default: terminate) gets the signal re-delivered, so the process ends as it would
    have, only after the block. Under ``SIG_IGN`` (e.g. a job started with ``&`` by a non-interactive
    shell) SIGINT is ignored anyway and nothing is installed. Outside the main thread, or when the handler
    was not installed from Python (``signal.getsignal`` gives None), signals cannot be held and the block
    simply runs.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None or previous == signal.SIG_IGN:
        yield
        return
    pending: list[Any] = []
    try:
        signal.signal(signal.SIGINT, lambda _sig, frame: pending.append(frame))
    except (ValueError, OSError):  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            if callable(previous):
                previous(signal.SIGINT, pending[0])
            else:  # SIG_DFL: let the OS default act now
                signal.raise_signal(signal.SIGINT)


@contextlib.contextmanager
def restoring(restore: Callable[[], None]) -> Iterator[None]:
    """Run the block as a transaction: on *any* ``BaseException`` (``KeyboardInterrupt``, ``SystemExit``,
    ``GeneratorExit`` included) call ``restore()`` with SIGINT held (:func:`interrupts_deferred`), then
    re-raise the exception unchanged. ``restore`` must bring the state back to what it was before the
    block, whichever instruction was interrupted."""
    try:
        yield
    except BaseException:
        with interrupts_deferred():
            restore()
        raise
