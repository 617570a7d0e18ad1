"""The ```python blocks of a Markdown file, and their quick variants for tests.

Standard library only: ``scripts/check_wheel.sh`` runs it inside a fresh venv that has no pytest.

    python tests/_snippets.py README.md 0 --quick > first.py   # the first block, with the quick settings

A quick variant replaces literal text of a block (fewer images, fewer epochs); every replacement must match
exactly once, so a README edit that removes the text fails the test instead of silently running the slow
version.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)

# file name -> block index -> (old, new) replacements that make the block run in seconds
QUICK: dict[str, dict[int, list[tuple[str, str]]]] = {
    "README.md": {
        0: [
            # 3 epochs of 16 steps: the cubic schedule (every=1, n=20) still finishes at step 20
            ("fashion_mnist_loaders(batch_size=128)", "fashion_mnist_loaders(batch_size=128, subset=2000)"),
        ],
        2: [("subset=2000", "subset=512")],
    },
}


def python_blocks(path: str | Path) -> list[str]:
    """The code of each ```python fenced block of ``path``, in order."""
    return FENCE.findall(Path(path).read_text(encoding="utf-8"))


def quick(path: str | Path, index: int) -> str:
    """Block ``index`` of ``path`` with its :data:`QUICK` replacements applied.

    Raises:
        ValueError: a replacement's text does not occur exactly once in the block.
    """
    code = python_blocks(path)[index]
    for old, new in QUICK.get(Path(path).name, {}).get(index, []):
        if code.count(old) != 1:
            raise ValueError(f"{path} block {index}: {old!r} occurs {code.count(old)} times (expected once)")
        code = code.replace(old, new)
    return code


def run_block(code: str, cwd: Path, timeout: float = 300) -> str:
    """Run ``code`` in a fresh interpreter in ``cwd`` (one intra-op thread, Hugging Face offline); return its
    stdout.

    Raises:
        AssertionError: a non-zero exit (the message holds the code, stdout and stderr), or a warning
            attributed to the block's own lines (secateur warns at the caller's line: the block misuses the
            API or its settings do not fit, e.g. a schedule longer than the training).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert r.returncode == 0, f"--- code\n{code}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
    assert "<string>:" not in r.stderr, r.stderr
    return r.stdout


if __name__ == "__main__":
    file, idx = sys.argv[1], int(sys.argv[2])
    sys.stdout.write(quick(file, idx) if "--quick" in sys.argv[3:] else python_blocks(file)[idx])
