"""Attention-head pruning of Hugging Face models: save_pretrained / from_pretrained round trip (with the
plan) and Michel et al. 2019 head importance.

Models are tiny and built from configs (random init, no downloads).
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import secateur as sc
from secateur.compact import check_equivalence, compact, make_plan, mask_model
from secateur.errors import SerializationError
from secateur.graph import DependencyGraph

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent / "graph"))
import hf_models  # noqa: E402


def tiny_bert():
    model, x = hf_models.bert()
    return model.eval(), {"input_ids": x["input_ids"]}


def tiny_gpt2():
    model, x = hf_models.gpt2(bos_token_id=0, eos_token_id=0)
    return model.eval(), x


def tiny_llama():
    model, x = hf_models.llama()
    return model.eval(), x


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
        model, x, criterion="l1", sparsity=0.5, protect=["*intermediate*", "*mlp*", "*pooler*"]
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
    model, plan = sc.prune_channels(model, x, criterion="l2", sparsity=0.5)
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


# ------------------------------------------------------------------------------ Michel et al. 2019
class Gated(torch.nn.Module):
    """A hand-written head gate: ``layer(z * ξ_h on head h's slice)``, ξ = 1 (Michel et al. 2019, eq. 2)."""

    def __init__(self, layer, n_heads):
        super().__init__()
        self.layer = layer
        self.xi = torch.nn.Parameter(torch.ones(n_heads, dtype=torch.float64))

    def forward(self, z):
        return self.layer(z * self.xi.repeat_interleave(z.shape[-1] // self.xi.numel()))


def gate_gradients(model, consumers, batch, y, loss_of):
    """``{consumer path: ∂L/∂ξ}`` (shape (heads,)) for the loss of ``batch`` with explicit gates."""
    gated = copy.deepcopy(model)
    gates = {}
    for path in consumers:
        parent, _, attr = path.rpartition(".")
        g = Gated(gated.get_submodule(path), 4)
        setattr(gated.get_submodule(parent), attr, g)
        gates[path] = g.xi
    loss = loss_of(gated(**batch), y)
    grads = torch.autograd.grad(loss, list(gates.values()))
    return dict(zip(gates, grads))


def calibration(n_batches=2, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        ({"input_ids": torch.randint(0, 99, (n, 6), generator=g)}, torch.randint(0, 3, (n,), generator=g))
        for _ in range(n_batches)
    ]


def bert_loss(out, y):
    return torch.nn.functional.cross_entropy(out.logits, y)


def gpt2_loss(out, y):  # next-token loss; y unused
    return out.loss


def consumer_of(graph, gi, model):
    from secateur.criteria.group import consumer_members

    (m,) = consumer_members(graph.groups[gi], model)
    return m


@pytest.mark.parametrize("per_example", [True, False])
def test_michel_scores_equal_explicit_head_gate_gradients_on_bert(per_example):
    torch.manual_seed(0)
    model, x = tiny_bert()
    model.double()
    graph = DependencyGraph.build(model, x)
    heads = head_groups(graph)
    crit = sc.criteria.group.get_group_criterion("michel", per_example=per_example, normalize_layers=False)
    prunable = [gi for gi, g in enumerate(graph.groups) if g.n_prunable]
    batches = calibration()
    # independent reference first (no hooks on the model): E|∂L/∂ξ_h| with explicit gates
    cons = {gi: consumer_of(graph, gi, model) for gi in heads}
    assert all(m.module.endswith("attention.output.dense") for m in cons.values())
    expected = {gi: np.zeros(4) for gi in heads}
    for batch, y in batches:
        if per_example:
            n = y.shape[0]
            for i in range(n):
                one = {k: v[i : i + 1] for k, v in batch.items()}
                grads = gate_gradients(model, [m.module for m in cons.values()], one, y[i : i + 1], bert_loss)
                for gi, m in cons.items():
                    expected[gi] += grads[m.module].abs().numpy() / n
        else:
            grads = gate_gradients(model, [m.module for m in cons.values()], batch, y, bert_loss)
            for gi, m in cons.items():
                expected[gi] += grads[m.module].abs().numpy()
    crit.attach(model, graph, prunable)
    for batch, y in batches:  # the user's loop: hooks record during backward
        model.zero_grad()
        bert_loss(model(**batch), y).backward()
    got = crit.scores(model, graph, prunable)
    crit.detach()
    assert sorted(got) == heads  # FFN and pooler groups are not scored with units="heads"
    for gi, m in cons.items():
        head_to_unit = m.unit_of[::8]  # head h = input channels 8h..8h+7 of the output projection
        assert sorted(head_to_unit.tolist()) == [0, 1, 2, 3]
        want = np.zeros(4)
        want[head_to_unit] = expected[gi] / len(batches)
        assert np.allclose(got[gi], want, rtol=1e-9, atol=1e-15), (got[gi], want)
        assert want.min() > 0


def test_michel_on_gpt2_conv1d_and_per_layer_l2_normalisation():
    """GPT-2's output projection is a Conv1D (weight (in, out)): the same hooks, no model-specific code."""
    torch.manual_seed(0)
    model, x = tiny_gpt2()
    model.double()
    graph = DependencyGraph.build(model, x)
    heads = head_groups(graph)
    ids = hf_models._ids(n=3, s=6, seed=2)
    batch = {"input_ids": ids, "labels": ids.clone(), "use_cache": False}
    cons = {gi: consumer_of(graph, gi, model) for gi in heads}
    grads = gate_gradients(model, [m.module for m in cons.values()], batch, None, gpt2_loss)
    crit = sc.criteria.group.MichelCriterion(per_example=False)
    crit.attach(model, graph, heads)
    gpt2_loss(model(**batch), None).backward()
    got = crit.scores(model, graph, heads)
    for gi, m in cons.items():
        raw = np.zeros(4)
        raw[m.unit_of[::8]] = grads[m.module].abs().numpy()
        assert np.allclose(got[gi], raw / np.linalg.norm(raw), rtol=1e-9)
        assert np.isclose(np.linalg.norm(got[gi]), 1.0)


def test_channel_pruner_with_michel_removes_lowest_heads_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model, x = tiny_bert()
    batches = calibration(n_batches=2, n=4)
    graph = DependencyGraph.build(model, x, protect=["*intermediate*", "*pooler*"])
    heads = head_groups(graph)
    assert [gi for gi, g in enumerate(graph.groups) if g.n_prunable] == heads
    # reference scores on the same batches, before the pruner exists: the 2 lowest of 8 heads must go
    reference = sc.criteria.group.MichelCriterion()
    reference.attach(model, graph, heads)
    sc.criteria.group.collect(reference, model, graph, heads, batches, bert_loss)
    reference.detach()
    ref = reference.scores(model, graph, heads)
    flat = sorted((s, gi, u) for gi in heads for u, s in enumerate(ref[gi]))
    want = {(gi, u) for _, gi, u in flat[:2]}
    pruner = sc.ChannelPruner(
        model, x, schedule=0.25, criterion="michel", data=batches, loss_fn=bert_loss, graph=graph
    )
    assert pruner.normalize == "none"  # scores are already per-layer normalised (Michel et al. sec. 4.1)
    pruner.step(0)  # no statistics yet: the pruner runs the calibration batches itself
    got = {(gi, int(u)) for gi, rm in pruner.removed.items() for u in rm}
    assert got == want
    p0 = n_params(model)
    model = pruner.finalize()  # the oracle runs inside
    assert n_params(model) < p0
    sc.save_pretrained(model, tmp_path, pruner.plan)
    again = sc.from_pretrained(tmp_path)
    assert torch.equal(logits(again, x), logits(model, x))
    heads_left = [again.get_submodule(p).num_attention_heads for p in sorted(pruner.plan["attributes"])]
    assert heads_left == [
        4 - sum(1 for g, _ in want if g == gi) for gi in heads if any(g == gi for g, _ in want)
    ]


def test_michel_bad_use_is_named():
    from secateur.criteria.group import available_group_criteria, get_group_criterion

    assert "michel" in available_group_criteria()
    with pytest.raises(sc.ConfigError, match="units must be"):
        get_group_criterion("michel", units="neurons")
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    graph = DependencyGraph.build(mlp, torch.randn(2, 4))
    ids = [gi for gi, g in enumerate(graph.groups) if g.n_prunable]
    with pytest.raises(sc.ConfigError, match="no attention-head group"):
        get_group_criterion("michel").attach(mlp, graph, ids)
    crit = get_group_criterion("michel", units="all")  # the gate on the hidden units of an MLP works
    crit.attach(mlp, graph, ids)
    with pytest.raises(sc.ConfigError, match="needs head-gate gradients"):
        crit.scores(mlp, graph, ids)
    z = torch.randn(5, 4)
    mlp(z).sum().backward()
    s = crit.scores(mlp, graph, ids)[ids[0]]
    h = torch.relu(mlp[0](z)).detach()
    direct = (h * mlp[2].weight.detach().sum(0)).abs().sum(0).double().numpy()  # Σ_n |h_n · ∂L/∂h_n|
    assert np.allclose(s, direct / np.linalg.norm(direct), rtol=1e-6)


# --------------------------------------------------------------------------------------- prune_heads
@pytest.mark.parametrize("name", sorted(MODELS))
def test_prune_heads_touches_only_heads_and_round_trips(tmp_path, name):
    torch.manual_seed(0)
    model, x = MODELS[name]()
    loss_of = bert_loss if name == "bert" else gpt2_loss
    batches = [
        ({**b, "labels": b["input_ids"]} if name == "gpt2" else b, y) for b, y in calibration(n_batches=1)
    ]
    before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model, plan = sc.prune_heads(model, x, 0.3, criterion="michel", data=batches, loss_fn=loss_of)
    removed = sum(len(g["removed"]) for g in plan["groups"])
    assert removed == 3  # ceil(0.3 * 8): global ranking until the ratio is reached
    assert all(g["n_units"] == 4 and len(g["removed"]) < 4 for g in plan["groups"])
    changed = {k for k, v in model.state_dict().items() if tuple(v.shape) != before[k]}
    assert changed and all(".attn." in k or ".attention." in k for k in changed)
    sc.save_pretrained(model, tmp_path, plan)
    assert torch.equal(logits(sc.from_pretrained(tmp_path), x), logits(model, x))


def test_prune_heads_uniform_with_a_data_free_criterion_and_bad_input():
    torch.manual_seed(0)
    model, x = tiny_llama()
    model, plan = sc.prune_heads(model, x, 0.5, criterion="l1", allocation="uniform")
    assert [len(g["removed"]) for g in plan["groups"]] == [2, 2]  # 4 key/value heads per layer, 2 go
    assert model.config.num_key_value_heads == 2 and model.config.num_attention_heads == 4
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    w = mlp[0].weight.clone()
    with pytest.raises(sc.ConfigError, match="no prunable attention heads"):
        sc.prune_heads(mlp, torch.randn(2, 4), 0.5, criterion="l1")
    bert, xb = tiny_bert()
    with pytest.raises(sc.ConfigError, match="michel.*needs head-gate gradients"):
        sc.prune_heads(bert, xb, 0.5)  # data-dependent criterion without data
    assert all(not m._forward_pre_hooks for m in bert.modules())  # hooks removed, model untouched
    assert torch.equal(mlp[0].weight, w)
    with pytest.raises(sc.ConfigError, match="sparsity"):
        sc.prune_heads(bert, xb, 1.0)
