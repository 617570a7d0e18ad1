"""Width pruning of real decoder families through the structural driver: GQA-safe heads (whole KV groups or
query heads evenly per KV group), MLP channels, uniform per layer with a config plain transformers reloads,
non-embedding parameter targets, and a named refusal of save_pretrained when the config cannot describe
the pruned model.

Tiny random Gemma 3 (explicit head_dim != hidden / heads, q_norm/k_norm, sliding-window layers, one or two KV
heads), Llama with GQA and Qwen2 (q/k/v biases, no head_dim in its config); weights re-drawn larger than
the Hugging Face init so that the oracle's relative tolerance means something.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import transformers
from torch import nn

import secateur as sc
from secateur.compact import mask_model, max_abs_diff
from secateur.errors import ConfigError
from secateur.llm import (
    UnloadableConfigError,
    parameter_counts,
    prune_decoder,
    structural_scores,
)
from secateur.llm.loadable import plain_save_problems

pytestmark = pytest.mark.usefixtures("one_thread")

SLIDING, FULL = "sliding_attention", "full_attention"
HIDDEN, INTER, LAYERS = 32, 48, 3


def _redraw(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() >= 2 else 0.1))
    return model.eval()


def gemma(kv: int = 1, attn: str = "sdpa") -> nn.Module:
    cfg = transformers.Gemma3TextConfig(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=kv,
        head_dim=16,  # explicit, not hidden / heads = 8
        sliding_window=4,
        max_position_embeddings=64,
        layer_types=[SLIDING, SLIDING, FULL],
        attn_implementation=attn,
    )
    return _redraw(transformers.Gemma3ForCausalLM(cfg))


def llama(kv: int = 2) -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=kv,
        max_position_embeddings=64,
    )
    return _redraw(transformers.LlamaForCausalLM(cfg))


def qwen2() -> nn.Module:
    cfg = transformers.Qwen2Config(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return _redraw(transformers.Qwen2ForCausalLM(cfg))


BUILD = {"gemma_mqa": gemma, "gemma_gqa": lambda: gemma(kv=2), "llama": llama, "qwen2": qwen2}


def calib(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, 9:] = 0  # right padding: excluded from the statistics
    return {"input_ids": ids, "attention_mask": mask}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def _attn(model: nn.Module, i: int) -> nn.Module:
    return model.model.layers[i].self_attn


@pytest.fixture
def oracle_calls(monkeypatch):
    """Counts the float64 oracle's comparisons (check_equivalence inside the compaction transaction)."""
    import secateur.compact.verify as verify

    calls = []
    real = verify.check_equivalence

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(verify, "check_equivalence", spy)
    return calls


# ---------------------------------------------------------------------------------------------------
# GQA-safe heads, MLP channels, uniform per layer
# ---------------------------------------------------------------------------------------------------
CASES = [
    ("gemma_mqa", "query_heads"),
    ("gemma_gqa", "query_heads"),
    ("gemma_gqa", "kv_groups"),
    ("llama", "query_heads"),
    ("llama", "kv_groups"),
    ("qwen2", "query_heads"),
    ("qwen2", "kv_groups"),
]


@pytest.mark.parametrize("arch, gqa", CASES)
def test_uniform_width_pruning_keeps_the_gqa_ratio_and_equals_the_masked_model(arch, gqa, oracle_calls):
    dense = BUILD[arch]()
    cfg0 = dense.config
    hd, kv0, h0 = _attn(dense, 0).head_dim, cfg0.num_key_value_heads, cfg0.num_attention_heads
    model, plan = prune_decoder(
        copy.deepcopy(dense),
        calib(),
        {"heads": 0.5, "mlp": 0.25},
        criterion="wanda_sp",
        gqa=gqa,
        uniform=True,
    )
    assert oracle_calls  # the float64 oracle ran inside the compaction
    cfg = model.config
    if gqa == "kv_groups":  # one of two KV heads goes, with its query heads
        assert (cfg.num_key_value_heads, cfg.num_attention_heads) == (kv0 // 2, h0 // 2)
    else:  # every KV head stays and loses half its query heads
        assert (cfg.num_key_value_heads, cfg.num_attention_heads) == (kv0, h0 // 2)
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.intermediate_size == INTER - INTER // 4
    assert getattr(cfg, "head_dim", None) == hd  # the head size is unchanged (written where it was derived)
    for i in range(LAYERS):  # every layer alike, and as the config says
        at = _attn(model, i)
        assert at.q_proj.out_features == cfg.num_attention_heads * hd == at.o_proj.in_features
        assert at.k_proj.out_features == cfg.num_key_value_heads * hd == at.v_proj.out_features
        assert at.num_key_value_groups == cfg.num_attention_heads // cfg.num_key_value_heads
        assert model.model.layers[i].mlp.up_proj.out_features == cfg.intermediate_size
        if gqa == "query_heads":  # keys and values untouched
            old = _attn(dense, i)
            assert torch.equal(at.k_proj.weight, old.k_proj.weight)
            assert torch.equal(at.v_proj.weight, old.v_proj.weight)
        if arch.startswith("gemma"):  # q_norm / k_norm act on head_dim: never pruned
            assert at.q_norm.weight.shape == (hd,) and at.k_norm.weight.shape == (hd,)
    x = {**calib(seed=5), "use_cache": False}
    assert max_abs_diff(mask_model(copy.deepcopy(dense), plan), model, x) <= 1e-6
    assert max_abs_diff(dense, model, x) > 1e-3  # pruning did change the function
    assert not plain_save_problems(model)  # loadable: plain save allowed


def _even_lowest(scores: np.ndarray, n_kv: int, r: int) -> list[int]:
    """r lowest-scoring query heads of every KV group (query head h reads KV head h // n_rep), ties: index."""
    n_rep = scores.size // n_kv
    out = []
    for j in range(n_kv):
        own = np.arange(j * n_rep, (j + 1) * n_rep)
        out += own[np.argsort(scores[own], kind="stable")[:r]].tolist()
    return sorted(out)


@pytest.mark.parametrize("arch", ["gemma_mqa", "llama"])
@pytest.mark.parametrize("criterion", ["llm_pruner", "wanda_sp"])
def test_query_heads_go_evenly_per_kv_group_lowest_scores_first(arch, criterion):
    dense, batch = BUILD[arch](), calib()
    graph, selection, scores = structural_scores(
        copy.deepcopy(dense), batch, criterion, layers=range(LAYERS), what=("heads",), gqa="query_heads"
    )
    heads = {gi: layer for gi, (layer, kind) in selection.items() if kind == "heads"}
    assert sorted(heads.values()) == list(range(LAYERS))
    assert all(scores[gi].shape == (4,) for gi in heads)  # one score per query head
    model, plan = prune_decoder(
        copy.deepcopy(dense),
        batch,
        0.5,
        criterion=criterion,
        what=("heads",),
        gqa="query_heads",
        uniform=True,
    )
    n_kv = dense.config.num_key_value_heads
    got = {g["group"]: g["removed"] for g in plan["groups"]}
    want = {graph.groups[gi].name: _even_lowest(scores[gi], n_kv, 1 if n_kv == 2 else 2) for gi in heads}
    assert got == want
    hd = _attn(dense, 0).head_dim
    for gi, layer in heads.items():  # the kept query rows and output columns are those of the kept heads
        kept = [h for h in range(4) if h not in want[graph.groups[gi].name]]
        rows = torch.cat([_attn(dense, layer).q_proj.weight[h * hd : (h + 1) * hd] for h in kept])
        cols = torch.cat([_attn(dense, layer).o_proj.weight[:, h * hd : (h + 1) * hd] for h in kept], 1)
        assert torch.equal(_attn(model, layer).q_proj.weight, rows)
        assert torch.equal(_attn(model, layer).o_proj.weight, cols)


# ---------------------------------------------------------------------------------------------------
# plain transformers reload, KV-cache decoding
# ---------------------------------------------------------------------------------------------------
_RELOAD = textwrap.dedent(
    """
    import json, sys, torch, transformers
    torch.set_num_threads(1)
    out = {}
    for name, folder in json.loads(sys.argv[1]).items():
        m = transformers.AutoModelForCausalLM.from_pretrained(folder).eval().double()  # as the original
        ids = torch.load(folder + "/ids.pt")
        with torch.no_grad():
            torch.save(m(ids, use_cache=False).logits, folder + "/logits.pt")
        out[name] = type(m).__name__
    assert not any(k.startswith("secateur") for k in sys.modules), "secateur was imported"
    print(json.dumps(out))
    """
)


def test_save_pretrained_reloads_in_plain_transformers_with_the_same_logits(tmp_path):
    ids = calib(seed=7)["input_ids"]
    settings = {
        "gemma_mqa": dict(gqa="query_heads", target="nonembedding_params", sparsity=0.3),
        "llama": dict(gqa="kv_groups", sparsity=0.5),
        "qwen2": dict(gqa="query_heads", sparsity={"heads": 0.5, "mlp": 0.25}, round_to=4),
    }
    models, folders = {}, {}
    for name, kw in settings.items():
        model, _ = prune_decoder(BUILD[name](), calib(), criterion="wanda_sp", uniform=True, **kw)
        folders[name] = str(tmp_path / name)
        model.save_pretrained(folders[name])
        torch.save(ids, tmp_path / name / "ids.pt")
        models[name] = model
    run = subprocess.run(
        [sys.executable, "-c", _RELOAD, json.dumps(folders)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for name, model in models.items():
        saved = json.loads((tmp_path / name / "config.json").read_text())
        cfg = model.config
        assert (saved["num_attention_heads"], saved["num_key_value_heads"], saved["intermediate_size"]) == (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.intermediate_size,
        )
        assert saved["head_dim"] == _attn(model, 0).head_dim
        with torch.no_grad():
            want = copy.deepcopy(model).double()(ids, use_cache=False).logits
        got = torch.load(tmp_path / name / "logits.pt")
        assert torch.allclose(got, want, rtol=0, atol=1e-10), (name, (got - want).abs().max())


@pytest.mark.parametrize(
    "arch, gqa, attn",
    [
        ("gemma_mqa", "query_heads", "sdpa"),
        ("gemma_mqa", "query_heads", "eager"),
        ("llama", "query_heads", None),
    ],
)
def test_kv_cache_decoding_equals_the_full_forward(arch, gqa, attn):
    dense = gemma(attn=attn) if attn else BUILD[arch]()
    # Gemma: 4 -> 3 query heads on its one KV head (n_rep 3: transformers' config validation refuses 3 heads
    # for hidden size 32, so not uniform=True, but every layer alike); Llama: 2 -> 1 per KV head
    sparsity = {"heads": 0.25 if attn else 0.5, "mlp": 0.25}
    model, _ = prune_decoder(dense, calib(), sparsity, criterion="llm_pruner", gqa=gqa, layers=range(LAYERS))
    assert _attn(model, 0).num_key_value_groups == (3 if attn else 1)
    model = model.double()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        out = model(ids[:, :3], attention_mask=mask[:, :3], use_cache=True)
        steps = [out.logits]
        for t in range(3, ids.shape[1]):  # past the sliding window of 4
            out = model(
                ids[:, t : t + 1],
                attention_mask=mask[:, : t + 1],
                cache=out.cache,
                use_cache=True,
            )
            steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, 1), full, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------------
# non-uniform widths: the named refusal of save_pretrained; secateur's own formats still work
# ---------------------------------------------------------------------------------------------------
def test_non_uniform_widths_refuse_save_pretrained_by_name(tmp_path):
    model, plan = prune_decoder(gemma(kv=2), calib(), 0.5, criterion="wanda_sp", gqa="query_heads")  # layer 1
    assert model.config.num_attention_heads == 4 and _attn(model, 1).q_proj.out_features == 2 * 16
    for m in (model, copy.deepcopy(model)):
        with pytest.raises(UnloadableConfigError, match="num_attention_heads") as err:
            m.save_pretrained(tmp_path / "hf")
        for words in ("intermediate_size", "uniform=True", "round_to", "secateur.save"):
            assert words in str(err.value)
        assert not (tmp_path / "hf").exists()  # nothing written
    ids = calib(seed=7)["input_ids"]
    with torch.no_grad():
        want = model(ids).logits
    sc.save(model, tmp_path / "sc", plan=plan)
    sc.save_pretrained(model, tmp_path / "pre", plan=plan)
    for again in (sc.load(tmp_path / "sc").eval(), sc.from_pretrained(tmp_path / "pre")):
        assert _attn(again, 1).num_key_value_groups == 1 and _attn(again, 0).num_key_value_groups == 2
        with torch.no_grad():
            assert torch.equal(again(ids).logits, want)
    # pruned again, every layer alike: the config describes it and the refusal is gone
    model, _ = prune_decoder(model, calib(), {"heads": 0.0, "mlp": 0.25}, criterion="wanda_sp", layers=[0, 2])
    assert (
        plain_save_problems(model)
    )  # still non-uniform (layer 1 has 2 query heads, 0 and 2 have 4)


# ---------------------------------------------------------------------------------------------------
# parameter targets
# ---------------------------------------------------------------------------------------------------
def _lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """The next-token loss on ``batch`` (padding ignored), in float64 on a copy."""
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        return float(copy.deepcopy(model).double()(**batch, labels=labels, use_cache=False).loss)


def _gemma_counts(h: int, c: int, hd: int = 16) -> int:
    """Parameters a tiny Gemma 3 loses per layer with h query heads and c MLP channels removed (no biases)."""
    return h * 2 * HIDDEN * hd + c * 3 * HIDDEN


@pytest.mark.parametrize("target, fraction", [("nonembedding_params", 0.2), ("nonembedding_params", 0.35)])
def test_nonembedding_target_is_reached_with_the_least_overshoot_and_loads(target, fraction):
    dense = gemma()
    before = parameter_counts(dense)
    assert before["embedding_params"] == 64 * HIDDEN  # the LM head is tied to the token table
    model, plan = prune_decoder(
        copy.deepcopy(dense),
        calib(),
        fraction,
        criterion="wanda_sp",
        gqa="query_heads",
        target=target,
        uniform=True,
    )
    after = parameter_counts(model)
    assert after["embedding_params"] == before["embedding_params"]
    removed = before["nonembedding_params"] - after["nonembedding_params"]
    # independent: every allowed (h query heads, c channels) pair per layer, per h the smallest c reaching the
    # goal; the one kept is the candidate whose pruned model has the lowest calibration loss
    goal = fraction * before["nonembedding_params"]
    pairs = []
    for h in (0, 2, 3):  # 3 query heads: transformers refuses a config with hidden size 32 and 3 heads
        c = next((c for c in range(INTER) if LAYERS * _gemma_counts(h, c) >= goal), None)
        if c is not None:
            pairs.append((h, c))
    h, c = 4 - model.config.num_attention_heads, INTER - model.config.intermediate_size
    assert (h, c) in pairs and len(pairs) > 1
    assert removed == LAYERS * _gemma_counts(h, c)
    assert goal <= removed < goal + LAYERS * 3 * HIDDEN  # overshoot below one MLP channel per layer
    loss = {}
    for hh, cc in pairs:  # the same scores, each pair's counts as per-group fractions
        other, _ = prune_decoder(
            copy.deepcopy(dense),
            calib(),
            {"heads": hh / 4, "mlp": cc / INTER},
            criterion="wanda_sp",
            gqa="query_heads",
            uniform=True,
        )
        loss[hh] = _lm_loss(other, calib())
    assert loss[h] <= min(loss.values()) + 1e-5, loss
    assert not plain_save_problems(model)


def test_params_target_counts_the_embeddings_too():
    dense = gemma()
    total = parameter_counts(dense)["params"]
    model, _ = prune_decoder(dense, calib(), 0.2, criterion="wanda_sp", gqa="query_heads", target="params")
    assert 0.2 * total <= total - parameter_counts(model)["params"] < 0.2 * total + 2 * 3 * HIDDEN  # 2 layers


def test_round_to_keeps_mlp_widths_multiples_under_a_target():
    dense = llama()
    kw = dict(criterion="wanda_sp", what=("mlp",), round_to=8, target="nonembedding_params", uniform=True)
    model, _ = prune_decoder(copy.deepcopy(dense), calib(), 0.3, **kw)
    widths = {model.model.layers[i].mlp.up_proj.out_features for i in range(LAYERS)}
    assert len(widths) == 1 and widths.pop() % 8 == 0 and model.config.intermediate_size % 8 == 0
    before, after = parameter_counts(dense), parameter_counts(model)
    removed = before["nonembedding_params"] - after["nonembedding_params"]
    assert (
        0.3 * before["nonembedding_params"]
        <= removed
        < 0.3 * before["nonembedding_params"] + LAYERS * 8 * 3 * HIDDEN
    )


# ---------------------------------------------------------------------------------------------------
# refusals: named, model untouched
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build, kwargs, match",
    [
        (gemma, {"gqa": "bogus"}, "gqa must be one of"),
        (gemma, {"target": "macs"}, "target must be one of"),
        (gemma, {"uniform": True, "layers": [1]}, "uniform=True prunes every layer"),
        (gemma, {"target": "nonembedding_params", "sparsity": {"mlp": 0.2}}, "one fraction"),
        (gemma, {"gqa": "query_heads", "target": "nonembedding_params", "sparsity": 0.95}, "unreachable"),
        (gemma, {"gqa": "kv_groups"}, "gqa='query_heads'"),  # MQA: no KV group can go
        (lambda: llama(kv=4), {"gqa": "query_heads"}, "no grouped-query attention"),
        (lambda: _redraw(transformers.GPT2LMHeadModel(_gpt2_cfg())), {"uniform": True}, "cannot express"),
    ],
)
def test_bad_inputs_are_named_and_leave_the_model_untouched(build, kwargs, match):
    model = build()
    state, cfg = _state(model), model.config.to_dict()
    with pytest.raises(ConfigError, match=match):
        prune_decoder(model, calib(), **{"sparsity": 0.5, "criterion": "wanda_sp", **kwargs})
    assert _same_state(model, state) and model.config.to_dict() == cfg
    assert "save_pretrained" not in model.__dict__
    assert all(p.grad is None for p in model.parameters())


def _gpt2_cfg() -> transformers.GPT2Config:
    return transformers.GPT2Config(
        vocab_size=64, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0
    )


def test_gpt2_heads_refused_by_name_and_its_mlp_reloads(tmp_path):
    """GPT-2 derives its head width from n_embd / n_head: uniform heads are refused naming the tensor and the
    field; its MLP width (n_inner=None means 4 * n_embd) is written explicitly and reloads."""
    model = _redraw(transformers.GPT2LMHeadModel(_gpt2_cfg()))
    with pytest.raises(ConfigError) as err:
        prune_decoder(model, calib(), 0.5, criterion="wanda_sp", uniform=True)
    assert "transformer.h.0.attn.c_attn" in str(err.value) and "num_attention_heads 4 -> 2" in str(err.value)
    model, _ = prune_decoder(model, calib(), 0.5, criterion="wanda_sp", uniform=True, what=("mlp",))
    assert model.config.n_inner == 2 * HIDDEN and not plain_save_problems(model)
    model.save_pretrained(tmp_path)
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = calib()["input_ids"]
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
