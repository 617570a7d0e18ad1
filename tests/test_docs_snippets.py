"""Every ```python block of docs/getting-started.md runs alone, as written, in a fresh interpreter in an empty
temporary folder (tests/_snippets.py), and prints what the page says it prints."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

from _snippets import python_blocks, run_block

PAGE = Path(__file__).resolve().parents[1] / "docs" / "getting-started.md"
BLOCKS = python_blocks(PAGE)


def _measure(out: str) -> None:
    lines = out.strip().splitlines()
    assert ast.literal_eval(lines[0])["params"] > 0 and ast.literal_eval(lines[1])["macs"] > 0
    assert len(lines) == 5 and all(line.startswith("LayerStats(") for line in lines[2:])


def _channels(out: str) -> None:
    assert "Conv2d(3, 16" in out and "Conv2d(16, 32" in out and "in_features=32, out_features=10" in out
    before, after = (int(v.replace(",", "")) for v in re.search(r"params ([\d,]+) -> ([\d,]+)", out).groups())
    assert after < before / 2


def _save(out: str) -> None:
    assert ast.literal_eval(out.strip()) == ["model.safetensors", "plan.json"]


def _loop(out: str) -> None:
    acc, zeros = re.search(r"test accuracy (\d\.\d+) at (\d+)% zeros", out).groups()
    assert 0.3 < float(acc) <= 1.0  # well above chance (0.1): the page says roughly 0.7
    assert 60 <= int(zeros) <= 80  # 80% of the scoped layers; stem and classifier kept dense


def _recipe(out: str) -> None:
    assert "granularity: channel" in out
    assert 0.4 <= float(out.strip().splitlines()[-1]) <= 0.55  # the MAC target: half


CHECKS = {0: _measure, 1: _channels, 2: _save, 3: _loop, 4: _recipe, 5: lambda out: None}


def test_the_page_has_the_blocks_this_file_checks():
    assert len(BLOCKS) == len(CHECKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_getting_started_block_runs_alone(index, tmp_path):
    out = run_block(BLOCKS[index], tmp_path)
    CHECKS[index](out)
    assert not os.listdir(tmp_path), "blocks write into a temporary folder of their own, not the cwd"
