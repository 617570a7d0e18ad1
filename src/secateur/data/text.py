"""Real English text (Debian ``fortunes``) and sentence-embedding quality measures.

The benchmarks and tests need real text that is available offline: the Debian ``fortune-mod``
data files (``/usr/share/games/fortunes``) hold thousands of short quotations separated by lines
holding a single ``%``. Only the plain-text files are read: the ``.dat`` index files are binary and
the ``off/`` folder (offensive fortunes) is never touched.

Sentence embeddings follow all-MiniLM-L6-v2's published recipe: mean of the last hidden states
over the attention mask, then L2 normalisation (Reimers & Gurevych 2019, "Sentence-BERT",
section 3, MEAN pooling; the model card adds the normalisation).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from secateur.errors import ConfigError, DataError

FORTUNES_DIR = Path("/usr/share/games/fortunes")
DEFAULT_FILES: tuple[str, ...] = ("fortunes", "literature", "science", "wisdom")

_ATTRIBUTION = re.compile(r"^\s*--\s")
_WS = re.compile(r"\s+")


@dataclass(frozen=True)
class FortuneSplit:
    """Cleaned entries (in file order) and a deterministic split of them.

    ``calibration`` and ``heldout`` are disjoint, shuffled with ``random.Random(seed)``.
    """

    entries: list[str]
    calibration: list[str]
    heldout: list[str]


def parse_fortune_file(path: Path, strip_attribution: bool = True) -> list[str]:
    """Split one fortune file on ``%`` lines and clean each entry (one line, single spaces).

    Attribution lines (``-- Mark Twain``) are dropped when ``strip_attribution`` so that the text is
    the quotation itself. Raises :class:`DataError` naming the file if it is not UTF-8 text.
    """
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e
    out = []
    for chunk in re.split(r"^%\s*$", raw, flags=re.M):
        lines = chunk.splitlines()
        if strip_attribution:
            lines = [ln for ln in lines if not _ATTRIBUTION.match(ln)]
        text = _WS.sub(" ", " ".join(lines)).strip()
        if text:
            out.append(text)
    return out


def load_fortunes(
    max_items: int | None = None,
    seed: int = 0,
    heldout_fraction: float = 0.5,
    files: Sequence[str] = DEFAULT_FILES,
    root: Path | str = FORTUNES_DIR,
    min_chars: int = 20,
    max_chars: int = 600,
    min_letter_fraction: float = 0.6,
) -> FortuneSplit:
    """Load cleaned fortunes and split them into calibration and held-out parts.

    Cleaning: whitespace collapsed, attribution lines dropped, entries shorter than ``min_chars``
    or longer than ``max_chars`` characters dropped, entries whose fraction of letters and spaces
    is below ``min_letter_fraction`` (ASCII art, tables) dropped, exact duplicates dropped.
    Then the entries are shuffled with ``random.Random(seed)``, cut to ``max_items`` and split:
    the first ``round(heldout_fraction * n)`` are held out, the rest calibrate.

    Raises:
        DataError: ``root`` or a named file is missing, or nothing survives cleaning.
        ConfigError: a file name inside ``off/`` or ending in ``.dat``, or a bad fraction.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ConfigError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: fortunes folder not found (Debian package 'fortunes')")
    entries: list[str] = []
    seen: set[str] = set()
    for name in files:
        if name.endswith(".dat") or name.startswith("off") or "/" in name:
            raise ConfigError(f"fortune file {name!r} is not allowed (only plain files, no .dat, no off/)")
        path = root / name
        if not path.is_file():
            raise DataError(f"{path}: fortune file not found")
        for text in parse_fortune_file(path):
            if not min_chars <= len(text) <= max_chars or text in seen:
                continue
            letters = sum(c.isalpha() or c == " " for c in text)
            if letters / len(text) < min_letter_fraction:
                continue
            seen.add(text)
            entries.append(text)
    if not entries:
        raise DataError(f"no usable fortunes in {root} files {list(files)}")
    order = list(entries)
    random.Random(seed).shuffle(order)
    if max_items is not None:
        order = order[:max_items]
    n_held = round(heldout_fraction * len(order))
    return FortuneSplit(entries=entries, calibration=order[n_held:], heldout=order[:n_held])


@torch.no_grad()
def sentence_embeddings(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 32,
    max_length: int = 64,
) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings, shape ``(len(texts), hidden)``, float32.

    Pooling averages ``last_hidden_state`` over tokens where ``attention_mask`` is 1 (padding
    excluded), as all-MiniLM-L6-v2 is trained to be used (Sentence-BERT MEAN pooling).
    """
    device = next(model.parameters()).device
    # Batch texts of similar length (less padding, same result), then restore the caller's order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    ordered = [texts[i] for i in order]
    out = []
    for i in range(0, len(ordered), batch_size):
        enc = tokenizer(
            ordered[i : i + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        enc = {k: v.to(device) for k, v in enc.items()}
        hidden = model(**enc).last_hidden_state.float()
        m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
    emb = torch.cat(out)
    result = torch.empty_like(emb)
    result[torch.tensor(order, dtype=torch.long)] = emb
    return result


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows of ``a`` and ``b`` (``(n, d)`` each), in [-1, 1]."""
    if a.shape != b.shape:
        raise ConfigError(f"embedding shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean().item()


def nearest_neighbours(emb: torch.Tensor) -> torch.Tensor:
    """Index of each row's nearest other row by cosine similarity, shape ``(n,)`` (self excluded)."""
    e = torch.nn.functional.normalize(emb.float(), dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(dim=1)


def retrieval_agreement(dense: torch.Tensor, pruned: torch.Tensor) -> float:
    """Fraction (in [0, 1]) of rows whose nearest neighbour within the set is the same dense vs pruned."""
    if dense.shape != pruned.shape or dense.shape[0] < 2:
        raise ConfigError(
            f"need two (n >= 2, d) embeddings of one shape, got {tuple(dense.shape)}, {tuple(pruned.shape)}"
        )
    return (nearest_neighbours(dense) == nearest_neighbours(pruned)).float().mean().item()
