import json
import pickle

import pytest
import torch
from torch import nn

import secateur as sc
from secateur.errors import SerializationError
from secateur.io import load, save
from secateur.masks import get_mask, masked_parameters
from secateur.pruners.oneshot import prune_channels
from secateur.zoo import create_model


def _out(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def test_zoo_model_with_element_masks_round_trips_exactly(tmp_path):
    model = create_model("resnet8")
    x = torch.randn(2, 1, 28, 28)
    pruner = sc.Pruner(model, 0.7)
    pruner.step(0)
    save(model, tmp_path / "m", metadata={"accuracy": 0.9})
    loaded = load(tmp_path / "m")
    assert torch.equal(_out(model, x), _out(loaded, x))
    names = {f"{p}.{n}" for p, _, n in masked_parameters(loaded)}
    assert names == {t.name for t in pruner.targets}
    for t in pruner.targets:
        mod = loaded.get_submodule(t.path)
        assert torch.equal(get_mask(mod), get_mask(t.module))
    doc = json.loads((tmp_path / "m" / "plan.json").read_text())
    assert doc["metadata"]["accuracy"] == 0.9 and doc["architecture"]["kind"] == "zoo"


def test_structurally_pruned_model_round_trips(tmp_path):
    model = create_model("vgg_small")
    x = torch.randn(2, 1, 28, 28)
    model.eval()
    model, plan = prune_channels(model, x, sparsity=0.4, criterion="l1")
    save(model, tmp_path / "p", plan=plan)
    loaded = load(tmp_path / "p")
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    assert torch.equal(_out(model, x), _out(loaded, x))


def test_huggingface_model_round_trips_with_original_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    model = transformers.BertModel(cfg).eval()
    ids = {"input_ids": torch.randint(0, 64, (1, 8))}
    model, plan = prune_channels(model, ids, sparsity=0.5, criterion="l1")
    save(model, tmp_path / "hf", plan=plan)
    loaded = load(tmp_path / "hf").eval()
    with torch.no_grad():
        a = model(**ids).last_hidden_state
        b = loaded(**ids).last_hidden_state
    assert torch.equal(a, b)


def test_refuses_pickle_and_torch_save(tmp_path):
    (tmp_path / "pk").mkdir()
    with (tmp_path / "pk" / "model.pkl").open("wb") as f:
        pickle.dump({"a": 1}, f)
    with pytest.raises(SerializationError, match=r"model\.pkl: is a pickle"):
        load(tmp_path / "pk")
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "w.pt")
    with pytest.raises(SerializationError, match=r"w\.pt: is a torch\.save archive"):
        load(tmp_path / "w.pt")
    # A pickle renamed to model.safetensors is refused before any parsing.
    model = create_model("lenet5")
    save(model, tmp_path / "ok")
    with (tmp_path / "ok" / "model.safetensors").open("wb") as f:
        pickle.dump({"weights": 1}, f)
    with pytest.raises(SerializationError, match=r"model\.safetensors: is a pickle"):
        load(tmp_path / "ok")


def test_truncated_and_misfit_files_name_the_file(tmp_path):
    model = create_model("lenet5")
    d = save(model, tmp_path / "m")
    w = d / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(SerializationError, match=r"model\.safetensors: cannot read"):
        load(d)
    d = save(model, tmp_path / "m2")
    (d / "plan.json").write_text((d / "plan.json").read_text()[:40])
    with pytest.raises(SerializationError, match=r"plan\.json: not valid JSON"):
        load(d)
    # A plan that does not fit the rebuilt architecture.
    d = save(model, tmp_path / "m3")
    doc = json.loads((d / "plan.json").read_text())
    doc["plan"] = {
        "version": 1,
        "tensors": {"nonexistent.weight": {"0": [0]}},
        "groups": [],
        "attributes": {},
        "config": {},
    }
    (d / "plan.json").write_text(json.dumps(doc))
    with pytest.raises(SerializationError, match=r"plan\.json: the plan does not fit"):
        load(d)
    # Weights from another architecture.
    d = save(model, tmp_path / "m4")
    doc = json.loads((d / "plan.json").read_text())
    doc["architecture"]["record"]["name"] = "resnet8"
    (d / "plan.json").write_text(json.dumps(doc))
    with pytest.raises(SerializationError, match=r"model\.safetensors: weights do not fit"):
        load(d)


def test_unknown_architecture_needs_factory(tmp_path):
    with pytest.raises(SerializationError, match="factory"):
        save(nn.Linear(3, 3), tmp_path / "x")
    save(nn.Linear(3, 3), tmp_path / "y", factory="tests.test_io:make_linear")


def make_linear() -> nn.Module:
    return nn.Linear(3, 3)
