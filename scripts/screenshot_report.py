#!/usr/bin/env python3
"""Screenshot an HTML report with headless Chromium (Debian's ``chromium`` package).

Usage: ``python scripts/screenshot_report.py report.html out.png [--width 1200 --height 2000]``

Why a browser: the report must prove that its embedded plots really render in a browser, not just
that the HTML contains base64 text. Chromium runs with a fresh profile in a temporary folder and
with every background network feature off, so the screenshot needs no network and leaves nothing
behind. Exit status: 0 on success, 2 if Chromium is not found, 1 if it failed to write the PNG.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """Path of a Chromium binary: ``$CHROMIUM`` if set, else the first candidate on PATH."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(html_path: str | os.PathLike[str], png_path: str | os.PathLike[str], *,
               width: int = 1200, height: int = 2000, timeout: float = 120.0,
               chromium: str | None = None) -> Path:
    """Render ``html_path`` in headless Chromium and save a ``width`` x ``height`` PNG at ``png_path``.

    Raises:
        FileNotFoundError: no Chromium binary, or the HTML file does not exist.
        RuntimeError: Chromium exited without writing the PNG (its stderr is in the message).
        subprocess.TimeoutExpired: Chromium ran longer than ``timeout`` seconds.
    """
    html_file = Path(html_path).resolve()
    if not html_file.is_file():
        raise FileNotFoundError(f"no HTML file at {html_file}")
    binary = chromium or find_chromium()
    if binary is None:
        raise FileNotFoundError("Chromium not found (apt-get install -y chromium, or set $CHROMIUM)")
    png = Path(png_path).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    if png.exists():
        png.unlink()
    with tempfile.TemporaryDirectory(prefix="secateur-chromium-") as profile:
        cmd = [
            binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
            f"--screenshot={png}", f"--window-size={width},{height}", html_file.as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "HOME": profile})
    if not png.is_file() or png.stat().st_size == 0:
        raise RuntimeError(f"chromium did not write {png} (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html")
    ap.add_argument("png")
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=2000)
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args(argv)
    if find_chromium() is None:
        print("error: Chromium not found; install Debian's package: apt-get install -y chromium",
              file=sys.stderr)
        return 2
    try:
        out = screenshot(args.html, args.png, width=args.width, height=args.height, timeout=args.timeout)
    except (RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
