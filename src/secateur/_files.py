"""File modes of what secateur publishes: the user's umask, as ``open()`` and ``mkdir()`` give.

Some writers create files with a private mode whatever the umask: ``safetensors.torch.save_file`` (0600 in
safetensors 0.8), ``tempfile.mkstemp`` (0600) and ``tempfile.mkdtemp`` (0700). A file or folder published
under its final name gets the mode a plain ``open(path, "w")`` / ``mkdir`` would have given it instead
(0644 / 0755 under the usual umask 022), so another user or a web server can read a saved model when the
user's umask allows it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

__all__ = ["current_umask", "file_stamps", "honour_umask", "honour_umask_of_changed"]

_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask (e.g. ``0o022``), read without changing it where the OS allows.

    Linux reports it in ``/proc/self/status``; elsewhere it is read by setting and restoring it under a lock
    (``os.umask`` has no read-only form).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike[str]) -> None:
    """Give ``path`` the mode ``open()`` (a file: 0666) or ``mkdir()`` (a folder: 0777) would, less the umask.

    Raises:
        OSError: ``path`` does not exist or its mode cannot be changed (not its owner).
    """
    p = Path(path)
    base = 0o777 if p.is_dir() else 0o666
    os.chmod(p, base & ~current_umask())


def file_stamps(directory: str | os.PathLike[str]) -> dict[str, tuple[int, int]]:
    """``{name: (inode, mtime in ns)}`` of the regular files directly in ``directory`` (none if it is absent).

    Taken before a third-party writer (``save_pretrained``) runs, it tells :func:`honour_umask_of_changed`
    which files that writer created or replaced. Symlinks are left out (never followed, never chmod-ed).
    """
    stamps: dict[str, tuple[int, int]] = {}
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return stamps
    for e in entries:
        if e.is_file(follow_symlinks=False):
            st = e.stat(follow_symlinks=False)
            stamps[e.name] = (st.st_ino, st.st_mtime_ns)
    return stamps


def honour_umask_of_changed(
    directory: str | os.PathLike[str], before: dict[str, tuple[int, int]]
) -> list[str]:
    """Apply :func:`honour_umask` to the regular files of ``directory`` that are new or changed since
    ``before`` (from :func:`file_stamps`); return their names, sorted. Files left untouched keep their mode.
    """
    changed = sorted(n for n, stamp in file_stamps(directory).items() if before.get(n) != stamp)
    for name in changed:
        honour_umask(Path(directory) / name)
    return changed
