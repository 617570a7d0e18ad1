"""Progress bars for steps that can take more than a few seconds (ONNX export, quantisation, a report).

A step such as one ``torch.onnx.export`` call is a single blocking call: a plain tqdm bar would sit still
until it ends. :class:`Steps` shows one bar over named steps on stderr and refreshes it from a
background thread twice a second, so the elapsed time keeps moving during a long step. With
``progress=None`` the bar shows only when stderr is a terminal (tqdm's ``disable=None``), so logs and
tests stay clean.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from types import TracebackType

from tqdm import tqdm

__all__ = ["Steps"]


class Steps:
    """A tqdm bar over ``total`` named steps; use :meth:`step` around each one.

    Args:
        desc: the bar's label (e.g. ``"report"``).
        total: the number of steps.
        progress: ``True`` always shows it, ``False`` never, ``None`` only when stderr is a terminal.
        refresh_s: seconds between refreshes by the background thread (only while shown).
    """

    def __init__(self, desc: str, total: int, progress: bool | None = None, refresh_s: float = 0.5) -> None:
        self.bar = tqdm(
            total=total,
            desc=desc,
            disable=None if progress is None else not progress,
            dynamic_ncols=True,
            leave=False,
            bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}] {postfix}",
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not self.bar.disable:
            self._thread = threading.Thread(target=self._tick, args=(refresh_s,), daemon=True)
            self._thread.start()

    def _tick(self, refresh_s: float) -> None:
        while not self._stop.wait(refresh_s):
            self.bar.refresh()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Show ``name`` as the current step; count it as done when the block ends without error."""
        self.bar.set_postfix_str(name, refresh=True)
        yield
        self.bar.update(1)

    def close(self) -> None:
        """Stop the refreshing thread and remove the bar."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.bar.close()

    def __enter__(self) -> Steps:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
