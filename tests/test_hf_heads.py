"""Attention-head pruning of Hugging Face models: save_pretrained / from_pretrained round trip (with the
plan) and Michel et al. 2019 head importance.

Models are tiny and built from configs (random init, no downloads).
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import secateur as sc
from secateur.compact import check_equivalence, compact, make_plan, mask_model
from secateur.errors import SerializationError
from secateur.graph import DependencyGraph

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _ids(n=2, s=7, vocab=99, seed=0):
    return torch.randint(0, vocab, (n, s), generator=torch.Generator().manual_seed(seed))


def tiny_bert():
    cfg = transformers.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(cfg).eval(), {"input_ids": _ids()}


def tiny_gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg).eval(), {"input_ids": _ids(), "use_cache": False}


def tiny_llama():
    cfg = transformers.LlamaConfig(
        vocab_size=99,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg).eval(), {"input_ids": _ids(), "use_cache": False}


MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2}


def head_groups(graph):
    """Indices of the groups whose units are attention heads (units spanning several channels)."""
    return [gi for gi, g in enumerate(graph.groups) if g.n_prunable and g.unit_size > 1]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def logits(model, x):
    return model(**x).logits


def prune_heads_non_uniformly(model, x):
    """Remove 1 head of layer 0 and 2 of layer 1 (and 5 FFN neurons of layer 0): returns (masked, plan)."""
    graph = DependencyGraph.build(model, x)
    hg = head_groups(graph)
    assert len(hg) == 2 and all(graph.groups[gi].n_units == 4 for gi in hg)
    ffn = next(
        gi for gi, g in enumerate(graph.groups) if g.n_prunable and g.unit_size == 1 and g.n_units > 32
    )
    plan = make_plan(graph, {hg[0]: [2], hg[1]: [0, 3], ffn: [1, 5, 8, 13, 21]})
    masked = mask_model(copy.deepcopy(model), plan)
    compact(model, plan)
    return masked, plan


# ------------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("name", sorted(MODELS))
def test_non_uniform_heads_round_trip_through_save_pretrained(tmp_path, name):
    torch.manual_seed(0)
    model, x = MODELS[name]()
    p0 = n_params(model)
    masked, plan = prune_heads_non_uniformly(model, x)
    assert check_equivalence(masked, model, x) <= 1e-6  # the oracle
    assert n_params(model) < p0
    # head attributes of each attention module: 3 and 2 heads kept, counted from the plan's removals
    kept = [g["n_units"] - len(g["removed"]) for g in plan["groups"] if g["n_units"] == 4]
    assert kept == [3, 2]
    heads_of = {
        path: next(v[1] for k, v in d.items() if "head" in k) for path, d in plan["attributes"].items()
    }
    assert sorted(heads_of.values()) == [2, 3]

    sc.save_pretrained(model, tmp_path, plan)
    assert {"config.json", "model.safetensors", "plan.json"} <= set(os.listdir(tmp_path))
    again = sc.from_pretrained(tmp_path)
    assert type(again) is type(model)
    assert torch.equal(logits(again, x), logits(model, x))  # bit-exact
    assert n_params(again) == n_params(model)
    for path, heads in heads_of.items():
        attrs = plan["attributes"][path]
        mod = again.get_submodule(path)
        for a, (_old, new) in attrs.items():
            assert getattr(mod, a) == new
        assert heads in (2, 3)
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    # the plain transformers loader cannot express per-layer head counts: it must fail, never load wrong
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert doc["transformers_loadable"] is False and doc["layout"] == "huggingface"
    with pytest.raises(RuntimeError, match="mismatch"):
        type(model).from_pretrained(tmp_path)
    # secateur.load reads the same folder
    assert torch.equal(logits(sc.load(tmp_path), x), logits(model, x))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_uniform_heads_in_models_without_head_dim_still_fail_loudly_in_transformers(tmp_path, name):
    """BERT/GPT-2 derive head width from hidden_size / heads: even a uniform head count in config.json
    would build other shapes, so transformers must refuse, and secateur must rebuild."""
    torch.manual_seed(0)
    model, x = MODELS[name]()
    model, plan = sc.prune_channels(
        model, x, criterion="l1", ratio=0.5, protect=["*intermediate*", "*mlp*", "*pooler*"]
    )
    assert len(plan["groups"]) == 2 and all(g["n_units"] - len(g["removed"]) == 2 for g in plan["groups"])
    assert next(iter(plan["config"].values()))["head_dim"] == [None, 8]
    assert not sc.io.transformers_loadable(model, plan)
    sc.save_pretrained(model, tmp_path, plan)
    with pytest.raises(RuntimeError, match="mismatch"):
        type(model).from_pretrained(tmp_path)
    assert torch.equal(logits(sc.from_pretrained(tmp_path), x), logits(model, x))


def test_llama_uniform_heads_load_with_plain_transformers_too(tmp_path):
    torch.manual_seed(0)
    model, x = tiny_llama()
    p0 = n_params(model)
    model, plan = sc.prune_channels(model, x, criterion="l2", ratio=0.5)
    assert n_params(model) < p0
    assert model.config.num_attention_heads == 4 and model.config.head_dim == 8
    sc.save_pretrained(model, tmp_path, plan)
    assert json.loads((tmp_path / "plan.json").read_text())["transformers_loadable"] is True
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours = sc.from_pretrained(tmp_path)
    ref = logits(model, x)
    assert torch.equal(logits(plain, x), ref)
    assert torch.equal(logits(ours, x), ref)
    assert ours.config.num_attention_heads == plain.config.num_attention_heads == 4


def test_sharded_checkpoint_with_tied_weights_round_trips(tmp_path):
    torch.manual_seed(0)
    model, x = tiny_gpt2()
    _, plan = prune_heads_non_uniformly(model, x)
    sc.save_pretrained(model, tmp_path, plan, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (
        tmp_path / "model.safetensors"
    ).exists()
    again = sc.from_pretrained(tmp_path)
    assert again.lm_head.weight is again.transformer.wte.weight  # still tied after the rebuild
    assert torch.equal(logits(again, x), logits(model, x))


def test_unpruned_model_round_trips_with_a_null_plan(tmp_path):
    torch.manual_seed(0)
    model, x = tiny_bert()
    sc.save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "plan.json").read_text())["transformers_loadable"] is True
    assert torch.equal(logits(sc.from_pretrained(tmp_path), x), logits(model, x))


# ----------------------------------------------------------------------------------------- bad input
def test_compacted_model_without_its_plan_is_refused_and_nothing_is_written(tmp_path):
    torch.manual_seed(0)
    model, x = tiny_bert()
    prune_heads_non_uniformly(model, x)
    with pytest.raises(
        SerializationError,
        match=r"layer\.0\.attention\..*\(32, 32\) \(rebuilt\) vs \(32, 24\) \(model\).*pass plan=",
    ):
        sc.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_wrong_plan_is_refused(tmp_path):
    torch.manual_seed(0)
    model, x = tiny_bert()
    other, _ = tiny_bert()
    _, plan = prune_heads_non_uniformly(model, x)
    graph = DependencyGraph.build(other, x)
    wrong = make_plan(graph, {head_groups(graph)[0]: [0, 1]})
    with pytest.raises(SerializationError, match="does not give this model's shapes"):
        sc.save_pretrained(model, tmp_path, wrong)


def test_masked_model_is_refused_and_left_untouched(tmp_path):
    torch.manual_seed(0)
    model, x = tiny_bert()
    pruner = sc.Pruner(model, schedule=sc.OneShot(0.5), criterion="magnitude")
    pruner.step(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SerializationError, match="still has masks"):
        sc.save_pretrained(model, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_non_hf_model_and_missing_files_are_named(tmp_path):
    with pytest.raises(SerializationError, match="Sequential"):
        sc.save_pretrained(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path)
    torch.manual_seed(0)
    model, x = tiny_bert()
    sc.save_pretrained(model, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(SerializationError, match="model.safetensors"):
        sc.from_pretrained(tmp_path / "m")
    with pytest.raises(SerializationError, match="plan.json"):
        sc.from_pretrained(tmp_path)


def test_from_pretrained_reads_a_secateur_save_folder(tmp_path):
    torch.manual_seed(0)
    model, x = tiny_gpt2()
    _, plan = prune_heads_non_uniformly(model, x)
    sc.save(model, tmp_path, plan=plan)
    assert torch.equal(logits(sc.from_pretrained(tmp_path), x), logits(model, x))
