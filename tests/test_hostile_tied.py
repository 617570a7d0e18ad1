"""Hostile ``"tied"`` records in plan.json (and in a compressed file's metadata): refused with a named error
naming the file and the field, nothing read outside the folder, no file changed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from secateur.errors import DataError, SerializationError
from secateur.io import load, save
from secateur.io.compressed import load_compressed, save_compressed
from secateur.io.validate import validate_tied
from test_hostile_folders import _assert_refused
from test_io_tied import tied_lm

HERE = "tests.test_io_tied"

CASES = {
    "not an object": (["head.weight"], r"plan\.json: tied: expected a JSON object, got an array"),
    "target not a name": ({"head.weight": 3}, r"plan\.json: tied\['head\.weight'\]: expected the name"),
    "alias names itself": ({"head.weight": "head.weight"}, r"tied\['head\.weight'\]: .*alias of itself"),
    "cycle": (
        {"head.weight": "emb.weight", "emb.weight": "head.weight"},
        r"plan\.json: tied\['head\.weight'\]: names 'emb\.weight', itself an alias",
    ),
    "alias to a missing name": (
        {"head.weight": "ghost.weight"},
        r"plan\.json: tied\['head\.weight'\]: names 'ghost\.weight', which the weights file does not hold",
    ),
    "alias also stored": (
        {"head.weight": "emb.weight", "body.bias": "emb.weight"},
        r"plan\.json: tied\['body\.bias'\]: the weights file also stores 'body\.bias'",
    ),
    "alias not a model tensor": (
        {"head.weight": "emb.weight", "ghost.weight": "emb.weight"},
        r"plan\.json: tied\['ghost\.weight'\]: the rebuilt model has no tensor 'ghost\.weight'",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_tied_record_is_refused_by_name(tmp_path, monkeypatch, case):
    tied, match = CASES[case]
    folder = save(tied_lm(), tmp_path / "f", factory=f"{HERE}:tied_lm")
    doc = json.loads((folder / "plan.json").read_text())
    doc["tied"] = tied
    (folder / "plan.json").write_text(json.dumps(doc))
    _assert_refused(SerializationError, match, folder, lambda: load(folder, factory=tied_lm), monkeypatch)


def test_alias_of_another_shape_the_model_does_not_tie_is_refused(tmp_path, monkeypatch):
    folder = save(tied_lm(), tmp_path / "f", factory=f"{HERE}:tied_lm")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["body.weight"]  # (32, 32), claimed to be the (512, 32) embedding
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "secateur"})
    doc = json.loads((folder / "plan.json").read_text())
    doc["tied"]["body.weight"] = "emb.weight"
    (folder / "plan.json").write_text(json.dumps(doc))
    match = r"model\.safetensors: 'body\.weight' is recorded as an alias of 'emb\.weight' \(\(512, 32\)\)"
    _assert_refused(SerializationError, match, folder, lambda: load(folder, factory=tied_lm), monkeypatch)


def test_non_string_alias_key_is_refused():
    with pytest.raises(SerializationError, match=r"plan\.json: tied: an alias must be a tensor name, got 1"):
        validate_tied({1: "emb.weight"}, "plan.json")


def test_hostile_tied_metadata_of_compressed_file_is_refused(tmp_path):
    path = save_compressed(tied_lm(), tmp_path / "c.safetensors")["path"]
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    for tied, match in (
        ({"head.weight": "ghost.weight"}, r"metadata tied\['head\.weight'\]: names 'ghost\.weight'"),
        ({"emb.weight": "emb.weight"}, r"metadata tied\['emb\.weight'\]: a tensor cannot be an alias"),
        ("[1]", r"bad\.safetensors: metadata tied: expected a JSON object, got an array"),
        ("{", r"bad\.safetensors: metadata tied is not JSON"),
    ):
        bad = tmp_path / "bad.safetensors"
        text = tied if isinstance(tied, str) else json.dumps(tied)
        save_file(tensors, str(bad), metadata={**meta, "tied": text})
        with pytest.raises(DataError, match=match):
            load_compressed(bad)
    assert torch.equal(load_compressed(path)["head.weight"], tensors["emb.weight"])
