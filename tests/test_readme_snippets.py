"""Every ```python block of README.md runs alone (its own imports, files only under its working directory),
each in a fresh interpreter in an empty temporary folder, with the quick settings of tests/_snippets.py
(fewer images and epochs; the replaced text must be present). What each block prints is checked too."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest
import torch

from _snippets import QUICK, python_blocks, quick, run_block

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCKS = python_blocks(README)


def _dense_resnet8_macs() -> int:
    import secateur as sc
    from secateur.zoo import create_model

    return sc.count_macs(create_model("resnet8"), torch.zeros(1, 1, 28, 28))["macs"]


def _check_first(out: str, tmp: Path) -> None:
    acc = float(re.search(r"^accuracy (\d\.\d+)$", out, re.M).group(1))
    assert 0.0 <= acc <= 1.0
    last = out.strip().splitlines()[-1]  # "{'params': ..., 'nonzero_params': ...} {'macs': ..., ...}"
    params = ast.literal_eval(last.split("} {")[0] + "}")
    assert params["nonzero_params"] < 0.3 * params["params"]  # 90% of the scoped weights are zero


def _check_structural(out: str, tmp: Path) -> None:
    before, after = (int(v.replace(",", "")) for v in re.search(r"MACs ([\d,]+) -> ([\d,]+)", out).groups())
    assert before == _dense_resnet8_macs() and after < before
    assert {p.name for p in (tmp / "out/pruned").iterdir()} == {"plan.json", "model.safetensors"}


def _check_recipe(out: str, tmp: Path) -> None:
    macs = ast.literal_eval(out.strip().splitlines()[-1])["macs"]
    assert macs <= 0.55 * _dense_resnet8_macs()  # the recipe's target: half the MACs


CHECKS = {0: _check_first, 1: _check_structural, 2: _check_recipe}


def test_readme_has_the_blocks_this_file_checks():
    assert len(BLOCKS) == len(CHECKS)
    assert set(QUICK["README.md"]) <= set(CHECKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs_alone(index, tmp_path):
    out = run_block(quick(README, index), tmp_path)
    CHECKS[index](out, tmp_path)
    leftovers = set(os.listdir(tmp_path)) - {"out"}
    assert not leftovers, f"block {index} wrote {leftovers} outside out/"
