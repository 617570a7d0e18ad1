"""Tied tensors (one storage under two names, e.g. an LM head that *is* the embedding) are written once by
``secateur.save`` and ``save_compressed``, recorded as aliases, and tied again on load."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from secateur.io import load, save
from secateur.io.compressed import load_compressed, save_compressed
from secateur.io.tied import tied_aliases
from secateur.masks import set_mask
from secateur.pruners.oneshot import prune_channels

sys.path.insert(0, str(Path(__file__).parent / "graph"))
from hf_models import gpt2  # noqa: E402

HERE = "tests.test_io_tied"


class TiedLM(nn.Module):
    """An embedding-dominated toy language model: ``head.weight`` is ``emb.weight`` when ``tie``."""

    def __init__(self, vocab: int, dim: int, tie: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(self.emb(ids))))


def tied_lm(vocab: int = 512, dim: int = 32, tie: bool = True) -> nn.Module:
    """The factory recorded in the folders below."""
    torch.manual_seed(0)
    return TiedLM(vocab, dim, tie)


IDS = torch.arange(0, 512, 37).reshape(2, -1)


def _keys(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def _doc(folder: Path) -> dict:
    return json.loads((folder / "plan.json").read_text())


def _save_tied(tmp_path: Path, name: str = "t", **kwargs) -> tuple[nn.Module, Path]:
    model = tied_lm(**kwargs).eval()
    return model, save(model, tmp_path / name, factory=f"{HERE}:tied_lm", factory_kwargs=kwargs)


def _as_old_format(folder: Path) -> None:
    """Rewrite ``folder`` as secateur wrote it before tied aliases were recorded: every name stored."""
    doc = _doc(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    for alias, target in doc.pop("tied").items():
        tensors[alias] = tensors[target].clone()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "secateur"})
    (folder / "plan.json").write_text(json.dumps(doc))


def test_tied_module_is_written_once_and_tied_again(tmp_path):
    model, folder = _save_tied(tmp_path)
    assert _keys(folder) == {"emb.weight", "body.weight", "body.bias"}
    assert _doc(folder)["tied"] == {"head.weight": "emb.weight"}
    _, untied = _save_tied(tmp_path, "u", tie=False)
    ratio = (folder / "model.safetensors").stat().st_size / (untied / "model.safetensors").stat().st_size
    assert ratio < 0.55  # the 512x32 table once instead of twice; the body is 1/16 of it
    loaded = load(folder, factory=tied_lm).eval()
    assert loaded.head.weight is loaded.emb.weight
    with torch.no_grad():
        assert torch.equal(loaded(IDS), model(IDS))


def test_gpt2_lm_head_is_stored_once_and_file_shrinks(tmp_path):
    model, inp = gpt2(vocab_size=2000)
    model.eval()
    folder = save(model, tmp_path / "g")
    assert _doc(folder)["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    assert "lm_head.weight" not in _keys(folder) and "transformer.wte.weight" in _keys(folder)
    new_size = (folder / "model.safetensors").stat().st_size
    _as_old_format(folder)  # what the writer stored before: the 2000x32 table twice
    assert new_size < 0.75 * (folder / "model.safetensors").stat().st_size


def test_pruned_gpt2_round_trips_tied(tmp_path):
    model, inp = gpt2(vocab_size=2000)
    model.eval()
    model, plan = prune_channels(model, inp, sparsity=0.5, criterion="l1")
    assert model.lm_head.weight is model.transformer.wte.weight
    folder = save(model, tmp_path / "p", plan=plan)
    assert _doc(folder)["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    loaded = load(folder).eval()
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    with torch.no_grad():
        assert torch.equal(loaded(**inp).logits, model(**inp).logits)


def test_old_folder_without_tied_still_loads(tmp_path):
    model, folder = _save_tied(tmp_path)
    _as_old_format(folder)
    assert "tied" not in _doc(folder) and "head.weight" in _keys(folder)
    loaded = load(folder, factory=tied_lm).eval()
    assert loaded.head.weight is loaded.emb.weight
    with torch.no_grad():
        assert torch.equal(loaded(IDS), model(IDS))


def test_alias_the_rebuilt_model_does_not_tie_gets_the_values(tmp_path):
    model, folder = _save_tied(tmp_path, tie=True)
    doc = _doc(folder)
    doc["architecture"]["kwargs"]["tie"] = False  # e.g. a factory that stopped tying
    (folder / "plan.json").write_text(json.dumps(doc))
    loaded = load(folder, factory=tied_lm).eval()
    assert loaded.head.weight is not loaded.emb.weight
    assert torch.equal(loaded.head.weight, model.emb.weight)
    with torch.no_grad():
        assert torch.equal(loaded(IDS), model(IDS))


def test_masked_tied_weight_is_stored_under_both_names(tmp_path):
    model = tied_lm().eval()
    mask = torch.rand(model.head.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    set_mask(model.head, mask, "weight")
    folder = save(model, tmp_path / "m", factory=f"{HERE}:tied_lm")
    # head.weight is computed (masked), emb.weight the raw storage: no alias, both stored as before.
    assert "tied" not in _doc(folder)
    assert {"head.weight", "emb.weight", "__mask__/head.weight"} <= _keys(folder)
    loaded = load(folder, factory=tied_lm).eval()
    assert loaded.emb.weight is loaded.head.parametrizations.weight.original
    with torch.no_grad():
        assert torch.equal(loaded(IDS), model(IDS))


def test_compressed_file_stores_tied_weight_once(tmp_path):
    model = tied_lm().eval()
    with torch.no_grad():
        model.body.weight[:, ::2] = 0
    info = save_compressed(model, tmp_path / "c.safetensors")
    with safe_open(str(info["path"]), framework="pt") as f:
        assert "head.weight" not in set(f.keys())
        assert json.loads(f.metadata()["tied"]) == {"head.weight": "emb.weight"}
    state = load_compressed(info["path"])
    assert torch.equal(state["head.weight"], model.emb.weight)
    fresh = tied_lm(tie=True)
    fresh.load_state_dict(state)  # strict: every name present
    with torch.no_grad():
        assert torch.equal(fresh(IDS), model(IDS))
    untied = save_compressed(tied_lm(tie=False), tmp_path / "u.safetensors")
    assert info["bytes"] < 0.55 * untied["bytes"]


def test_only_true_aliases_count():
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {
        "a": base,
        "same": base.detach(),  # same storage, offset, shape and stride: an alias
        "equal": base.clone(),  # equal values, other memory
        "row": base[1],  # a view at another offset and shape
        "t": base.t(),  # same storage, other stride
        "e1": torch.empty(0),
        "e2": torch.empty(0),
        "__mask__/a": base,
    }
    assert tied_aliases(tensors, skip_prefix="__mask__/") == {"same": "a"}
