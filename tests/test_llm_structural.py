"""Structural pruning of decoder LLMs (LLM-Pruner style) and expert removal in MoE models.

Every score is checked against an independent computation written here from the paper's formula, every
compaction against the masked model (float64), and every failure path against the untouched model.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from torch import nn

import secateur as sc
from secateur.compact import mask_model, max_abs_diff
from secateur.criteria.group import TaylorCriterion, collect, get_group_criterion
from secateur.errors import CompactionError, ConfigError
from secateur.graph import DependencyGraph
from secateur.llm import (
    LLMPrunerTaylor,
    WandaStructured,
    causal_lm_data,
    causal_lm_loss,
    decoder_groups,
    decoder_layer_groups,
    expert_saliency,
    find_moe_blocks,
    mask_experts,
    prune_decoder,
    remove_experts,
    structural_scores,
)
from secateur.llm.moe import eager_experts

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent / "graph"))
import hf_models  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one thread is faster on 2 shared cores

HD = 8  # head_dim of the tiny Llama
N_REP = 2  # query heads per KV head


def _llama(layers: int = 4, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    m = hf_models.llama(num_hidden_layers=layers, intermediate_size=48)[0].eval()
    with torch.no_grad():  # HF init has tiny std: larger weights make scores and outputs distinct
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return m


def _calib(n: int = 3, s: int = 10, pad: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 99, (n, s), generator=g)
    am = torch.ones_like(ids)
    am[-1, s - pad :] = 0  # a padded sequence: padding must not count
    return {"input_ids": ids, "attention_mask": am}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def _attn(model, i):
    return model.model.layers[i].self_attn


def _mlp(model, i):
    return model.model.layers[i].mlp


# ---------------------------------------------------------------------------------------------------
# prune_decoder
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("criterion", ["llm_pruner", "wanda_sp", "random"])
def test_layer_range_respected_gqa_consistent_and_params_drop(criterion):
    dense = _llama()
    model = copy.deepcopy(dense)
    model, plan = prune_decoder(model, _calib(), sparsity=0.5, criterion=criterion)  # default: layers 1..2
    for i in (0, 3):  # first and last layers: bit-identical
        for (k, a), (_, b) in zip(
            model.model.layers[i].state_dict().items(), dense.model.layers[i].state_dict().items()
        ):
            assert torch.equal(a, b), (i, k)
    for i in (1, 2):
        at, old = _attn(model, i), _attn(dense, i)
        kv = at.k_proj.out_features // HD
        assert kv == 2  # floor(0.5 * 4) KV heads removed
        assert at.q_proj.out_features == kv * N_REP * HD == at.o_proj.in_features
        assert at.v_proj.out_features == kv * HD
        # which KV heads survived: match k_proj rows to the dense heads' rows
        kept = [
            j
            for j in range(4)
            if any(
                torch.equal(old.k_proj.weight[j * HD : (j + 1) * HD], at.k_proj.weight[r * HD : (r + 1) * HD])
                for r in range(kv)
            )
        ]
        assert len(kept) == kv
        # GQA: the query heads kept are exactly those reading the kept KV heads, in order
        rows = torch.cat([old.q_proj.weight[j * N_REP * HD : (j + 1) * N_REP * HD] for j in kept])
        assert torch.equal(at.q_proj.weight, rows)
        cols = torch.cat([old.o_proj.weight[:, j * N_REP * HD : (j + 1) * N_REP * HD] for j in kept], 1)
        assert torch.equal(at.o_proj.weight, cols)
        assert _mlp(model, i).up_proj.out_features == 24 == _mlp(model, i).down_proj.in_features
    # the layers disagree now: the config keeps the dense values and the plan says why
    assert model.config.num_attention_heads == 8 and model.config.intermediate_size == 48
    assert "_inconsistent_num_attention_heads" in plan["config"][""]
    assert sc.count_params(model)["params"] < sc.count_params(dense)["params"]


def test_oracle_compacted_equals_masked_float64():
    dense = _llama()
    batch = _calib()
    model, plan = prune_decoder(
        copy.deepcopy(dense), batch, sparsity=0.3, criterion="llm_pruner", layers=[1, 2]
    )
    x = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    masked = mask_model(copy.deepcopy(dense), plan)
    assert max_abs_diff(masked, model, x) <= 1e-6
    assert max_abs_diff(dense, model, x) > 1e-3  # and pruning did change the function


def _head_slices(attn: nn.Module, j: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """(weight, grad-or-None placeholder, dim) slices of KV head j: q/k/v rows and o_proj columns."""
    q = slice(j * N_REP * HD, (j + 1) * N_REP * HD)
    kv = slice(j * HD, (j + 1) * HD)
    return [
        (attn.q_proj.weight, q, 0),
        (attn.k_proj.weight, kv, 0),
        (attn.v_proj.weight, kv, 0),
        (attn.o_proj.weight, q, 1),
    ]


def _take(t: torch.Tensor, sl: slice | int, dim: int) -> torch.Tensor:
    return t[sl] if dim == 0 else t[:, sl].T  # rows of the slice, one per index


def _units(graph: DependencyGraph, selection: dict, layer: int) -> tuple[int, int, dict, dict]:
    """Group ids of the layer's heads and MLP groups and maps KV head -> unit, channel -> unit."""
    gh = next(gi for gi, (li, k) in selection.items() if li == layer and k == "heads")
    gm = next(gi for gi, (li, k) in selection.items() if li == layer and k == "mlp")
    km = next(m for m in graph.groups[gh].members if m.name.endswith(f"{layer}.self_attn.k_proj.weight"))
    um = next(m for m in graph.groups[gm].members if m.name.endswith(f"{layer}.mlp.up_proj.weight"))
    return gh, gm, {j: int(km.unit_of[j * HD]) for j in range(4)}, {c: int(um.unit_of[c]) for c in range(48)}


def _lm_grads(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    model.zero_grad()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss.backward()
    out = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("variant", ["element1", "vector", "element2"])
def test_taylor_scores_match_llm_pruner_formula(variant):
    model = _llama(layers=3)
    batch = _calib()
    graph, selection, scores = structural_scores(
        model, batch, "llm_pruner", layers=[1], criterion_kwargs={"variant": variant}
    )
    assert all(p.grad is None for p in model.parameters())  # gradients left as they were
    # independent: g = mean gradient, F = mean of per-sequence squared gradients (LLM-Pruner's acc_grad)
    if variant == "element2":
        per = [_lm_grads(model, {k: v[i : i + 1] for k, v in batch.items()}) for i in range(3)]
        g = {n: sum(p[n] for p in per) / 3 for n in per[0]}
        fis = {n: sum(p[n] ** 2 for p in per) / 3 for n in per[0]}
    else:
        g = _lm_grads(model, batch)
    names = {id(p): n for n, p in model.named_parameters()}

    def index_scores(w: torch.Tensor, sl, dim: int) -> torch.Tensor:
        n = names[id(w)]
        wd = w.detach().double()
        wg = _take(wd * g[n], sl, dim)
        if variant == "vector":
            return wg.sum(1).abs()
        if variant == "element1":
            return wg.abs().sum(1)
        return (wg - 0.5 * _take(wd * wd * fis[n], sl, dim)).abs().sum(1)

    gh, gm, head_unit, chan_unit = _units(graph, selection, 1)
    attn, mlp = _attn(model, 1), _mlp(model, 1)
    for j in range(4):
        want = sum(float(index_scores(w, sl, d).sum()) for w, sl, d in _head_slices(attn, j))
        assert scores[gh][head_unit[j]] == pytest.approx(want, rel=1e-6)
    for c in range(48):
        want = sum(
            float(index_scores(w, slice(c, c + 1), d).sum())
            for w, d in ((mlp.gate_proj.weight, 0), (mlp.up_proj.weight, 0), (mlp.down_proj.weight, 1))
        )
        assert scores[gm][chan_unit[c]] == pytest.approx(want, rel=1e-6)


def test_wanda_structured_scores_match_hand_computation():
    model = _llama(layers=3)
    batch = _calib(pad=4)
    graph, selection, scores = structural_scores(model, batch, "wanda_sp", layers=[1])
    real = batch["attention_mask"].bool()
    seen: dict[str, list[torch.Tensor]] = {}
    mods = {
        "q": _attn(model, 1).q_proj,
        "o": _attn(model, 1).o_proj,
        "up": _mlp(model, 1).up_proj,
        "down": _mlp(model, 1).down_proj,
    }
    hooks = [
        m.register_forward_hook(lambda _m, a, _o, k=k: seen.setdefault(k, []).append(a[0][real]))
        for k, m in mods.items()
    ]
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    norm = {k: torch.cat(v).double().pow(2).sum(0).sqrt() for k, v in seen.items()}  # ||X_j||_2, real tokens
    attn, mlp = _attn(model, 1), _mlp(model, 1)
    gh, gm, head_unit, chan_unit = _units(graph, selection, 1)
    for j in range(4):
        want = 0.0
        for w, sl, d in _head_slices(attn, j):
            a = w.detach().double().abs()
            if d == 0:  # rows of q/k/v: inputs are the attention block's input (q, k, v read the same x)
                want += float((a[sl] * norm["q"]).sum())
            else:  # o_proj columns: inputs are the attention output features of this head
                want += float((a[:, sl] * norm["o"][sl]).sum())
        assert scores[gh][head_unit[j]] == pytest.approx(want, rel=1e-6)
    for c in range(48):
        want = float((mlp.gate_proj.weight[c].detach().double().abs() * norm["up"]).sum())
        want += float((mlp.up_proj.weight[c].detach().double().abs() * norm["up"]).sum())
        want += float(mlp.down_proj.weight[:, c].detach().double().abs().sum() * norm["down"][c])
        assert scores[gm][chan_unit[c]] == pytest.approx(want, rel=1e-6)


def test_uniform_pruning_config_reloads_with_plain_from_pretrained(tmp_path):
    model, _plan = prune_decoder(_llama(), _calib(), sparsity=0.5, layers=range(4), criterion="wanda_sp")
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, cfg.head_dim) == (
        4,
        2,
        24,
        8,
    )
    model.save_pretrained(tmp_path)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = _calib()["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_layer_range_round_trip_with_plan(tmp_path):
    model, plan = prune_decoder(_llama(), _calib(), sparsity=0.5, layers=[1, 2], criterion="llm_pruner")
    sc.save(model, tmp_path / "pruned", plan=plan)
    again = sc.load(tmp_path / "pruned").eval()
    ids = _calib()["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert again.model.layers[1].self_attn.q_proj.out_features == 32
    assert again.model.layers[0].self_attn.q_proj.out_features == 64


def test_what_and_round_to():
    dense = _llama(layers=3)
    model, _ = prune_decoder(copy.deepcopy(dense), _calib(), sparsity=0.3, what=("mlp",), round_to=8)
    at, old = _attn(model, 1), _attn(dense, 1)
    assert all(torch.equal(a, b) for a, b in zip(at.parameters(), old.parameters()))  # heads untouched
    assert _mlp(model, 1).up_proj.out_features == 40  # 48 - floor(0.3*48)=34, rounded up to a multiple of 8


def test_gpt2_conv1d_heads_and_mlp():
    torch.manual_seed(0)
    dense = hf_models.gpt2(n_layer=3)[0].eval()
    model, plan = prune_decoder(copy.deepcopy(dense), _calib(), sparsity=0.5, criterion="wanda_sp")
    h = model.transformer.h[1]
    assert h.attn.c_attn.weight.shape == (32, 3 * 16) and h.mlp.c_fc.weight.shape == (32, 64)
    assert model.transformer.h[0].attn.c_attn.weight.shape == (32, 96)
    x = {"input_ids": _calib()["input_ids"], "use_cache": False}
    assert max_abs_diff(mask_model(copy.deepcopy(dense), plan), model, x) <= 1e-6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": {"attn": 0.2}}, "unknown kind"),
        ({"sparsity": {"mlp": -0.1}}, "sparsity for mlp"),
        ({"layers": [9]}, "out of range"),
        ({"criterion": "l7"}, "unknown group criterion"),
        ({"criterion_kwargs": {"variant": "element3"}}, "variant"),
        ({"what": ("experts",)}, "subset"),
        ({"round_to": 0}, "round_to"),
    ],
)
def test_bad_arguments_are_named_and_leave_model_untouched(kwargs, match):
    model = _llama(layers=3)
    state = _state(model)
    with pytest.raises(ConfigError, match=match):
        prune_decoder(model, _calib(), **{"sparsity": 0.2, **kwargs})
    assert _same_state(model, state)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_failed_compaction_rolls_back(monkeypatch):
    model = _llama(layers=3)
    state, cfg = _state(model), model.config.to_dict()

    def broken(*_a, **_k):  # fails inside compaction, after tensors were already sliced
        raise RuntimeError("injected failure")

    monkeypatch.setattr("secateur.compact.apply._update_module", broken)
    with pytest.raises(CompactionError, match="injected"):
        prune_decoder(model, _calib(), sparsity=0.5, layers=range(3))
    assert _same_state(model, state) and model.config.to_dict() == cfg
    assert _attn(model, 1).q_proj.out_features == 64


def test_decoder_groups_kinds():
    model = _llama(layers=3)
    graph = DependencyGraph.build(model, {"input_ids": _calib()["input_ids"], "use_cache": False})
    sel = decoder_groups(model, graph, layers=[0, 1, 2])
    assert sorted(sel.values()) == [(i, k) for i in range(3) for k in ("heads", "mlp")]
    for gi, (_, kind) in sel.items():
        assert graph.groups[gi].n_units == (4 if kind == "heads" else 48)


# ---------------------------------------------------------------------------------------------------
# one driver: prune_decoder is a call of ChannelPruner; its plan is LLM-Pruner's per-layer selection
# ---------------------------------------------------------------------------------------------------
def _per_layer_selection(graph, selection, scores, sparsity, round_to=1) -> dict[str, list[int]]:
    """LLM-Pruner's per-layer rule written out here (what prune_decoder chose before it became a call of
    the driver): in each selected group the floor(s * n) lowest scores (ties in index order), fewer so that a
    unit stays and kept MLP counts are multiples of round_to (heads are never rounded)."""
    out = {}
    for gi, (_, kind) in selection.items():
        g = graph.groups[gi]
        assert g.n_prunable == g.n_units
        s = sparsity[kind] if isinstance(sparsity, dict) else sparsity
        k = math.floor(s * g.n_units + 1e-9)
        if kind == "mlp" and round_to > 1:
            k = max(0, g.n_units - math.ceil((g.n_units - k) / round_to) * round_to)
        k = min(k, g.n_units - 1)
        if k > 0:
            out[g.name] = sorted(np.argsort(scores[gi], kind="stable")[:k].tolist())
    return out


@pytest.mark.parametrize(
    "criterion, kwargs",
    [
        ("llm_pruner", {"variant": "element1"}),
        ("llm_pruner", {"variant": "vector"}),
        ("wanda_sp", {}),
        ("random", {}),
    ],
)
@pytest.mark.parametrize("sparsity, round_to", [(0.3, 1), (0.5, 1), ({"heads": 0.25, "mlp": 0.5}, 8)])
def test_plan_is_the_per_layer_selection_of_the_scores(criterion, kwargs, sparsity, round_to):
    dense, batch = _llama(), _calib()
    graph, selection, scores = structural_scores(
        copy.deepcopy(dense), batch, criterion, criterion_kwargs=kwargs, seed=3
    )
    _, plan = prune_decoder(
        copy.deepcopy(dense),
        batch,
        sparsity,
        criterion=criterion,
        criterion_kwargs=kwargs,
        round_to=round_to,
        seed=3,
    )
    want = _per_layer_selection(graph, selection, scores, sparsity, round_to)
    assert {g["group"]: g["removed"] for g in plan["groups"]} == want
    assert [g["group"] for g in plan["groups"]] == [
        graph.groups[gi].name for gi in sorted(selection) if graph.groups[gi].name in want
    ]


def test_llm_criteria_through_the_channel_pruner_match_prune_decoder():
    """The registered criteria run from the driver's own API (group filter, causal-LM data and loss) and
    select what prune_decoder removes; "llm_pruner" is not "taylor" (Molchanov et al.'s criterion)."""
    dense, batch = _llama(), _calib()
    x = {
        "input_ids": batch["input_ids"][:2],
        "attention_mask": batch["attention_mask"][:2],
        "use_cache": False,
    }
    for name in ("llm_pruner", "wanda_sp"):
        model = copy.deepcopy(dense)
        pruner = sc.ChannelPruner(
            model,
            x,
            schedule=0.5,
            criterion=name,
            allocation="uniform",
            groups=decoder_layer_groups(),
            data=causal_lm_data(batch),
            loss_fn=causal_lm_loss,
        )
        with torch.no_grad():
            selected = {pruner.graph.groups[gi].name: rm.tolist() for gi, rm in pruner.select(0.5).items()}
        pruner.close()
        _, plan = prune_decoder(copy.deepcopy(dense), batch, 0.5, criterion=name)
        assert {g["group"]: g["removed"] for g in plan["groups"]} == selected
    assert type(get_group_criterion("llm_pruner")) is LLMPrunerTaylor
    assert type(get_group_criterion("taylor")) is TaylorCriterion


def test_taylor_in_prune_decoder_is_molchanov():
    """criterion="taylor" means one criterion everywhere: per unit (Σ_members Σ_{s∈u} w_s g_s)², one batch."""
    model, batch = _llama(layers=3), _calib()
    graph, selection, scores = structural_scores(model, batch, "taylor", layers=[1], what=("mlp",))
    g = _lm_grads(model, batch)
    names = {id(p): n for n, p in model.named_parameters()}
    mlp = _mlp(model, 1)
    (gm,) = selection
    um = next(m for m in graph.groups[gm].members if m.name.endswith("1.mlp.up_proj.weight"))
    for c in range(48):
        total = 0.0
        for w, d in ((mlp.gate_proj.weight, 0), (mlp.up_proj.weight, 0), (mlp.down_proj.weight, 1)):
            wg = w.detach().double() * g[names[id(w)]]
            total += float(wg[c].sum() if d == 0 else wg[:, c].sum())
        assert scores[gm][int(um.unit_of[c])] == pytest.approx(total**2, rel=1e-6)


def test_scoring_restores_modes_and_flags_and_reaches_frozen_weights():
    model, batch = _llama(layers=3), _calib()
    _, _, want = structural_scores(model, batch, "llm_pruner", layers=[1])
    model.train()
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)
    _, _, got = structural_scores(model, batch, "llm_pruner", layers=[1])
    assert all(m.training for m in model.modules())  # scored in eval mode, modes put back
    assert not model.model.layers[1].mlp.up_proj.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert got.keys() == want.keys() and all(np.array_equal(got[gi], want[gi]) for gi in want)


def test_collect_forward_only_and_per_sample():
    """The driver's data collection runs what the criterion needs: no loss and no gradient for Wanda-sp,
    one sample per backward for LLM-Pruner's element2."""
    model, batch = _llama(layers=3), _calib()
    graph = DependencyGraph.build(model, {"input_ids": batch["input_ids"][:2], "use_cache": False})
    gids = sorted(decoder_groups(model, graph, layers=[1]))

    def no_loss(_out, _y):
        raise AssertionError("a forward-only criterion asked for a loss")

    wanda = WandaStructured()
    collect(wanda, model, graph, gids, causal_lm_data(batch), no_loss)
    assert not wanda.handles and all(p.grad is None for p in model.parameters())
    assert {s.n_tokens for s in wanda.stats.values()} == {int(batch["attention_mask"].sum())}
    sizes: list[int] = []
    taylor = LLMPrunerTaylor("element2")
    collect(
        taylor,
        model,
        graph,
        gids,
        causal_lm_data(batch),
        lambda out, y: sizes.append(y.shape[0]) or causal_lm_loss(out, y),
    )
    assert sizes == [1, 1, 1] and set(taylor.count.values()) == {3}


def test_topk_rule_reads_dim_not_k():
    """topk(x, k, dim): the graph used to take k for the dim (an IndexError inside every MoE router)."""

    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 5)
            self.out = nn.Linear(6, 3)

        def forward(self, x):
            vals, _ = torch.topk(self.proj(x), 2, dim=-1)  # mixes proj's 5 outputs
            return self.out(x) * vals.sum(-1, keepdim=True)

    graph = DependencyGraph.build(Router(), torch.randn(4, 6))
    g = graph.group_of("proj.weight", 0)
    assert g is None or g.n_prunable == 0  # frozen: topk compares its channels


# ---------------------------------------------------------------------------------------------------
# mixture of experts
# ---------------------------------------------------------------------------------------------------
def _moe(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    common = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=16,
        num_experts_per_tok=2,
        max_position_embeddings=32,
    )
    if kind == "mixtral":
        m = transformers.MixtralForCausalLM(transformers.MixtralConfig(num_local_experts=6, **common))
    elif kind == "qwen2_moe":
        m = transformers.Qwen2MoeForCausalLM(
            transformers.Qwen2MoeConfig(
                num_experts=6, moe_intermediate_size=16, shared_expert_intermediate_size=16, **common
            )
        )
    else:
        m = transformers.Qwen3MoeForCausalLM(
            transformers.Qwen3MoeConfig(
                num_experts=6, moe_intermediate_size=16, head_dim=8, norm_topk_prob=True, **common
            )
        )
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return m.eval()


def _n_experts_cfg(model) -> int:
    cfg = model.config
    return cfg.num_local_experts if hasattr(cfg, "num_local_experts") else cfg.num_experts


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_expert_saliency_matches_hand_computation(kind, reduction):
    model = _moe(kind)
    batch = _calib(pad=4)
    got = expert_saliency(model, batch, reduction=reduction)
    real = batch["attention_mask"].bool()
    inputs: dict[str, torch.Tensor] = {}
    blocks = find_moe_blocks(model)
    hooks = [
        model.get_submodule(b.path).register_forward_pre_hook(
            lambda _m, a, p=b.path: inputs.__setitem__(p, a[0][real].detach())
        )
        for b in blocks
    ]
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    normalise = kind == "mixtral" or model.config.norm_topk_prob
    for b in blocks:
        block = model.get_submodule(b.path)
        x = inputs[b.path].double()  # (real tokens, hidden)
        probs = torch.softmax(x @ block.gate.weight.double().T, -1)
        top, idx = probs.topk(2, -1)
        if normalise:
            top = top / top.sum(-1, keepdim=True)
        want = torch.zeros(6, dtype=torch.float64)
        count = torch.zeros(6, dtype=torch.float64)
        gu, down = block.experts.gate_up_proj.double(), block.experts.down_proj.double()
        for t in range(x.shape[0]):
            for r in range(2):
                e = int(idx[t, r])
                gate, up = (gu[e] @ x[t]).chunk(2)
                y = down[e] @ (torch.nn.functional.silu(gate) * up)
                want[e] += top[t, r] * y.norm()
                count[e] += 1
        if reduction == "mean":
            want = torch.where(count > 0, want / count.clamp_min(1), want)
        assert torch.allclose(got[b.path], want, rtol=1e-4, atol=1e-7), (b.path, got[b.path], want)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_remove_experts_oracle_config_and_lowest_removed(kind):
    dense = _moe(kind)
    batch = _calib()
    sal = expert_saliency(dense, batch)
    model, plan = remove_experts(copy.deepcopy(dense), batch, sparsity=0.5)
    removed = {}
    for b in find_moe_blocks(dense):
        low = sorted(torch.argsort(sal[b.path], stable=True)[:3].tolist())
        removed[b.path] = low
        keep = [e for e in range(6) if e not in low]
        new = model.get_submodule(b.path)
        old = dense.get_submodule(b.path)
        assert torch.equal(new.gate.weight, old.gate.weight[keep])
        assert torch.equal(new.experts.gate_up_proj, old.experts.gate_up_proj[keep])
        assert torch.equal(new.experts.down_proj, old.experts.down_proj[keep])
        assert new.experts.num_experts == 3 == new.gate.num_experts
    assert [g["removed"] for g in plan["groups"]] == list(removed.values())
    assert _n_experts_cfg(model) == 3
    # oracle: the removed experts' router logits at -inf in the dense model
    reference = mask_experts(copy.deepcopy(dense), removed)
    picked = []
    hook = reference.model.layers[0].mlp.gate.register_forward_hook(lambda _m, _a, out: picked.append(out[2]))
    x = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    with eager_experts(reference, model, dense):
        assert max_abs_diff(reference, model, x) <= 1e-6
        assert max_abs_diff(dense, model, x) > 1e-4
        with torch.no_grad():
            reference(**x)
    hook.remove()
    assert not np.isin(picked[-1].numpy(), removed["model.layers.0.mlp"]).any()
    assert model.config._experts_implementation == dense.config._experts_implementation


def test_remove_experts_round_trips(tmp_path):
    model, _ = remove_experts(_moe("mixtral"), _calib(), sparsity=0.5)
    model.save_pretrained(tmp_path / "hf")
    again = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = _calib()["input_ids"]
    assert again.config.num_local_experts == 3
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    # one layer only: the config cannot hold both counts, the plan can
    model2, plan2 = remove_experts(_moe("qwen3_moe"), _calib(), sparsity=0.5, layers=[1])
    # Qwen3-MoE's num_experts is an alias of num_local_experts
    assert "_inconsistent_num_local_experts" in plan2["config"][""] and model2.config.num_experts == 6
    sc.save(model2, tmp_path / "sc", plan=plan2)
    again2 = sc.load(tmp_path / "sc").eval()
    assert again2.model.layers[0].mlp.experts.num_experts == 6
    assert again2.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 3
    with torch.no_grad():
        assert torch.equal(model2(ids).logits, again2(ids).logits)
    # the Hugging Face layout plus the plan (transformers 5 fuses experts: saved under the model's own names)
    sc.save_pretrained(model2, tmp_path / "pre", plan=plan2)
    again3 = sc.from_pretrained(tmp_path / "pre")
    assert again3.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 3
    with torch.no_grad():
        assert torch.equal(model2(ids).logits, again3(ids).logits)


def test_remove_experts_is_transactional(monkeypatch):
    model = _moe("mixtral")
    state, cfg = _state(model), model.config.to_dict()
    impl = model.config._experts_implementation

    def broken(*_a, **_k):
        raise CompactionError("injected failure")

    monkeypatch.setattr("secateur.llm.moe.check_equivalence", broken)
    with pytest.raises(CompactionError, match="injected"):
        remove_experts(model, _calib(), sparsity=0.5)
    assert _same_state(model, state) and model.config.to_dict() == cfg
    assert (
        model.model.layers[0].mlp.experts.num_experts == 6 and model.model.layers[0].mlp.gate.num_experts == 6
    )
    assert model.config._experts_implementation == impl
    assert type(model.model.layers[0].mlp.gate).__name__ == "MixtralTopKRouter"


def test_remove_experts_bad_input_named_and_untouched():
    model = _moe("mixtral")
    state = _state(model)
    with pytest.raises(ConfigError, match="top_k=2"):
        remove_experts(model, _calib(), sparsity=0.9)  # floor(5.4) = 5 removed: 1 left < top_k
    with pytest.raises(ConfigError, match=r"sparsity must be a fraction in \[0, 1\)"):
        remove_experts(model, _calib(), sparsity=1.0)
    with pytest.raises(ConfigError, match="top_k=2"):
        remove_experts(model, _calib(), removed={"model.layers.0.mlp": [0, 1, 2, 3, 4]})
    with pytest.raises(ConfigError, match="not a sparse-MoE block"):
        remove_experts(model, _calib(), removed={"model.layers.0.self_attn": [0]})
    with pytest.raises(ConfigError, match="no MoE block"):
        remove_experts(model, _calib(), sparsity=0.5, layers=[5])
    with pytest.raises(ConfigError, match="no sparse-MoE block"):
        remove_experts(_llama(layers=2), _calib(), sparsity=0.5)
    assert _same_state(model, state)
