"""Shared by the benchmark scripts: write a generated Markdown block between two marker comments."""

from __future__ import annotations

from pathlib import Path


def write_block(path: Path, begin: str, end: str, body: str, heading: str = "") -> None:
    """Replace the text between ``begin`` and ``end`` in ``path`` (markers kept) with ``body``; if the markers
    are missing, append ``heading`` and the marked block at the end (the file is created if absent)."""
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + heading + block + "\n"
    path.write_text(text)
