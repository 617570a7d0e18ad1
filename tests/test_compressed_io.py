"""Bitmask-compressed safetensors for element-sparse weights: exact round trip, sizes, layout, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from secateur.errors import ConfigError, DataError
from secateur.io.compressed import load_compressed, save_compressed
from secateur.masks import has_mask
from secateur.pruners.element import Pruner


def _two_four(w: torch.Tensor) -> torch.Tensor:
    """``w`` with the two smallest |values| of every group of four consecutive row elements zeroed."""
    g = w.reshape(w.shape[0], -1, 4)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, dim=-1).indices, True)
    return (g * keep).reshape(w.shape)


def _effective(model: nn.Module) -> dict[str, torch.Tensor]:
    from secateur.analysis.onnx import baked_copy

    return baked_copy(model).state_dict()


def test_masked_model_round_trip_is_exact_and_smaller(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 64),
                          nn.Linear(64, 10))
    Pruner(model, 0.5).step(0)  # 50% unstructured, as masks (parametrizations)
    ref = _effective(model)
    info = save_compressed(model, tmp_path / "m.safetensors")
    assert has_mask(model[3])  # the model is untouched
    back = load_compressed(tmp_path / "m.safetensors")
    assert set(back) == set(ref)
    for k, v in ref.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    zeros = {k: float((v == 0).float().mean()) for k, v in ref.items() if k.endswith(".weight")}
    sparse = info["compressed_weights"]
    # Weights at least 40% zeros always pay off; a weight with no zeros never does.
    assert {k for k, z in zeros.items() if z >= 0.4} <= set(sparse) <= {k for k, z in zeros.items() if z > 0}
    assert len(sparse) >= 2 and info["dense_weights"] == [k for k in zeros if k not in sparse]
    # On disk: the stored values (half) + one bit per element + row offsets, against 4 bytes per element.
    dense_file = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in ref.items()}, str(dense_file))
    weights = sum(ref[k].numel() for k in sparse)
    others = sum(v.numel() for k, v in ref.items() if k not in sparse)
    nonzero = sum(int((ref[k] != 0).sum()) for k in sparse)
    rows = sum(ref[k].shape[0] for k in sparse)
    payload = 4 * (nonzero + others) + weights / 8 + 8 * rows
    assert payload <= info["bytes"] < payload + 4096  # plus the JSON header
    assert info["bytes"] < 0.65 * dense_file.stat().st_size


def test_two_four_round_trip_and_bf16(tmp_path: Path) -> None:
    torch.manual_seed(1)
    state = {"a.weight": _two_four(torch.randn(8, 16)), "a.bias": torch.randn(8),
             "b.weight": _two_four(torch.randn(4, 8)).to(torch.bfloat16), "c.weight": torch.randn(4, 6)}
    state["a.weight"][0, :8] = 0  # groups with fewer than two non-zeros store zeros in their slots
    info = save_compressed(state, tmp_path / "s.safetensors", compression="sparse-24-bitmask")
    assert info["compressed_weights"] == ["a.weight", "b.weight"] and info["dense_weights"] == ["c.weight"]
    back = load_compressed(tmp_path / "s.safetensors")
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    raw = load_file(str(tmp_path / "s.safetensors"))
    assert raw["a.compressed"].shape == (8, 8) and raw["a.bitmask"].shape == (8, 2)
    assert raw["a.shape"].tolist() == [[8], [16]] and "a.row_offsets" not in raw


def test_bitmask_bit_order_is_least_significant_first(tmp_path: Path) -> None:
    """Element j of a row is bit j % 8 of byte j // 8, least significant first (compressed-tensors' order)."""
    w = torch.tensor([[1.0, 0, 2, 0, 0, 0, 0, 3, 4, 0]])  # kept: 0, 2, 7 | 8
    save_compressed({"fc.weight": w}, tmp_path / "b.safetensors")
    raw = load_file(str(tmp_path / "b.safetensors"))
    assert raw["fc.bitmask"].tolist() == [[0b10000101, 0b00000001]]
    assert raw["fc.compressed"].tolist() == [1.0, 2.0, 3.0, 4.0] and raw["fc.shape"].tolist() == [1, 10]


def test_layout_matches_compressed_tensors_bit_packing(tmp_path: Path) -> None:
    """The bitmask decodes with compressed-tensors' own unpack_bitmasks (the standard's bit order)."""
    ct = pytest.importorskip("compressed_tensors.utils")
    torch.manual_seed(2)
    w = torch.randn(5, 21) * (torch.rand(5, 21) > 0.6)
    save_compressed({"fc.weight": w}, tmp_path / "c.safetensors")
    raw = load_file(str(tmp_path / "c.safetensors"))
    mask = ct.unpack_bitmasks(raw["fc.bitmask"], list(w.shape))
    assert torch.equal(mask, w != 0)
    assert torch.equal(raw["fc.compressed"], w[w != 0])
    counts = (w != 0).sum(1)
    assert torch.equal(raw["fc.row_offsets"], torch.cumsum(counts, 0) - counts)
    with safe_open(str(tmp_path / "c.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["compression"] == "sparse-bitmask" and json.loads(meta["compressed_weights"]) == ["fc.weight"]


def test_named_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown compression 'sparse-bitmap'.*sparse-bitmask"):
        save_compressed({"w": torch.zeros(2)}, tmp_path / "x", compression="sparse-bitmap")
    with pytest.raises(ConfigError, match="dict of tensors"):
        save_compressed({"w": 3}, tmp_path / "x")  # type: ignore[dict-item]
    w = torch.randn(4, 8) * (torch.rand(4, 8) > 0.7)
    with pytest.raises(ConfigError, match="'fc.shape'"):
        save_compressed({"fc.weight": w, "fc.shape": torch.zeros(2)}, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="not found"):
        load_compressed(tmp_path / "missing.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(DataError, match="plain.safetensors is not a secateur compressed file"):
        load_compressed(plain)
    good = tmp_path / "c.safetensors"
    save_compressed({"fc.weight": w}, good)
    raw = load_file(str(good))
    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    raw["fc.compressed"] = raw["fc.compressed"][:-1]  # one value lost
    save_file(raw, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(DataError, match=r"fc\.bitmask marks \d+ values but fc\.compressed holds"):
        load_compressed(tmp_path / "bad.safetensors")
    del raw["fc.row_offsets"]
    save_file(raw, str(tmp_path / "bad2.safetensors"), metadata=meta)
    with pytest.raises(DataError, match="fc.weight lacks"):
        load_compressed(tmp_path / "bad2.safetensors")
