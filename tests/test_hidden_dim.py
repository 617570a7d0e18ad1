"""Hidden-dimension pruning through normalisation modules (``build(..., prune_normalized=True)``).

The hidden size of a transformer runs through every LayerNorm / RMSNorm. Pruning it is exact only if the
masked model computes each norm's statistics over the kept channels, as the compacted one does; these tests
check that property against formulas written out here, the oracle on tiny BERT, GPT-2, ViT and Llama
models (random init, built from configs), the config update, and save / load round trips.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secateur as sc
from secateur._torch import call_model
from secateur.compact import check_equivalence, compact, make_plan, mask_model
from secateur.compact.norms import KeptChannelsNorm, norm_masks, remove_norm_masks, set_norm_masks
from secateur.errors import CompactionError
from secateur.graph import DependencyGraph
from secateur.graph.norms import find_norms, norm_kind, probe_norm, register_norm

sys.path.insert(0, str(Path(__file__).parent / "graph"))
from graph_helpers import RTOL, assert_outputs_close, prune_and_check  # noqa: E402
from hf_models import HF_MODELS  # noqa: E402

transformers = pytest.importorskip("transformers")

RATIO = 0.3
# prune_and_check returns the worst *relative* difference max|a-b| / max(max|a|, max|b|) between the masked
# and the pruned model's outputs, both run in float64, and has already asserted it is <= RTOL (the oracle's
# rule, secateur.compact.verify). `diff <= RTOL` below states that bound where the test relies on it: exact
# up to one part in a million of the outputs' own magnitude, whatever that magnitude is.


def _hidden(model) -> int:
    cfg = model.config
    return cfg.hidden_size


def _norm_modules(model):
    return [(p, m) for p, m in model.named_modules() if norm_kind(m) is not None]


def _hidden_group(graph, model):
    """The group of the first norm module's weight: the residual stream."""
    path = _norm_modules(model)[0][0]
    return graph.group_of(f"{path}.weight", 0)


def _embedding_width(model) -> int:
    emb = model.get_input_embeddings()
    if isinstance(emb, nn.Embedding):
        return emb.embedding_dim
    return emb.projection.out_channels  # ViT: the patch projection's output channels


# ------------------------------------------------------------------------------------------------------
# the mask-aware norm against formulas written out here
# ------------------------------------------------------------------------------------------------------
def _masked_out(mod, x, kept):
    """Output of ``mod`` with a KeptChannelsNorm hook for ``kept`` on a copy (the module is untouched)."""
    m = copy.deepcopy(mod)
    d = -1 if not isinstance(m, nn.GroupNorm) else 1
    m.register_forward_hook(KeptChannelsNorm("n", kept, d, x.shape[d]), with_kwargs=True, prepend=True)
    return m(x)


def test_kept_layer_norm_equals_layer_norm_over_kept_channels():
    torch.manual_seed(1)
    n, kept = 10, [0, 2, 3, 7, 9]
    ln = nn.LayerNorm(n, eps=1e-5).double()
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(3, 4, n, dtype=torch.float64) * 3 + 1  # removed channels hold non-zero values
    y = _masked_out(ln, x, kept)
    # independent: mean and biased variance over the kept channels only
    xs = x[..., kept]
    mu = xs.mean(-1, keepdim=True)
    var = ((xs - mu) ** 2).mean(-1, keepdim=True)
    ref = (xs - mu) / torch.sqrt(var + 1e-5) * ln.weight[kept] + ln.bias[kept]
    removed = [i for i in range(n) if i not in kept]
    assert torch.allclose(y[..., kept], ref, atol=1e-12)
    assert torch.equal(y[..., removed], torch.zeros_like(y[..., removed]))
    # and it is not what the full LayerNorm gives on the kept channels (the statistics differ)
    assert (ln(x)[..., kept] - ref).abs().max() > 1e-2


def test_kept_rms_norms_equal_rms_over_kept_channels():
    torch.manual_seed(2)
    n, kept = 8, [1, 2, 5, 6]
    x = torch.randn(2, 5, n, dtype=torch.float64)
    xs = x[..., kept]
    w = torch.randn(n, dtype=torch.float64)
    eps = 1e-6
    ref = xs / torch.sqrt(xs.pow(2).mean(-1, keepdim=True) + eps) * w[kept]
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    for mod in (nn.RMSNorm(n, eps=eps).double(), LlamaRMSNorm(n, eps=eps).double()):
        with torch.no_grad():
            mod.weight.copy_(w)
        y = _masked_out(mod, x, kept)
        # LlamaRMSNorm computes in float32 by design: compare at float32 precision there
        tol = 1e-12 if isinstance(mod, nn.RMSNorm) else 1e-5
        assert torch.allclose(y[..., kept], ref, atol=tol), type(mod).__name__
        assert not y[..., [0, 3, 4, 7]].any()


def test_kept_group_norm_one_group_over_kept_channels():
    torch.manual_seed(3)
    c, kept = 6, [0, 1, 4]
    gn = nn.GroupNorm(1, c).double()
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    x = torch.randn(2, c, 3, 3, dtype=torch.float64)
    y = _masked_out(gn, x, kept)
    xs = x[:, kept]
    mu = xs.mean((1, 2, 3), keepdim=True)
    var = ((xs - mu) ** 2).mean((1, 2, 3), keepdim=True)
    w, b = gn.weight[kept].view(1, -1, 1, 1), gn.bias[kept].view(1, -1, 1, 1)
    assert torch.allclose(y[:, kept], (xs - mu) / torch.sqrt(var + gn.eps) * w + b, atol=1e-12)
    assert not y[:, [2, 3, 5]].any()


def test_kept_norm_gradient_reaches_only_kept_weights():
    ln = nn.LayerNorm(6).double()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    ln.register_forward_hook(KeptChannelsNorm("ln", [0, 1, 3], -1, 6), with_kwargs=True, prepend=True)
    (ln(x) * torch.arange(1.0, 7.0, dtype=torch.float64)).sum().backward()
    assert ln.weight.grad[[0, 1, 3]].abs().min() > 0
    assert not ln.weight.grad[[2, 4, 5]].any() and not ln.bias.grad[[2, 4, 5]].any()
    assert not x.grad[:, [2, 4, 5]].any()  # removed input channels do not influence anything


class Standardize(nn.Module):
    """A weightless last-dim norm whose forward accepts any width."""

    def forward(self, x):
        return (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True)


def test_kept_norm_wrong_width_is_named():
    mod = Standardize()
    mod.register_forward_hook(KeptChannelsNorm("enc.ln", [0, 1], -1, 6), with_kwargs=True)
    assert mod(torch.randn(2, 6))[:, 2:].eq(0).all()
    with pytest.raises(CompactionError, match="'enc.ln' \\(Standardize\\): input has 5 channels"):
        mod(torch.randn(2, 5))


# ------------------------------------------------------------------------------------------------------
# default: frozen with the named reason
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,reason",
    [
        ("bert", "'layer_norm' normalises over a channel dim"),
        ("vit", "'layer_norm' normalises over a channel dim"),
        ("llama", "reduction over a channel dim (masked and pruned models would differ)"),
    ],
)
def test_without_opt_in_hidden_stays_frozen(name, reason):
    model, x = HF_MODELS[name]()
    g = _hidden_group(DependencyGraph.build(model, x), model)
    assert g.n_prunable == 0
    assert any(reason in r for r in g.reasons), g.reasons
    g2 = _hidden_group(DependencyGraph.build(model, x, prune_normalized=True), model)
    assert g2.n_prunable == g2.n_units == _hidden(model)


# ------------------------------------------------------------------------------------------------------
# BERT, GPT-2, ViT, Llama: 30% of the hidden dim, oracle, config, round trips
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bert", "gpt2", "vit", "llama"])
def test_hidden_dim_pruned_exactly(name, tmp_path):
    torch.manual_seed(0)
    model, x = HF_MODELS[name]()
    model.eval()
    h = _hidden(model)
    expect = h - math.floor(RATIO * h)
    n_dense = sum(p.numel() for p in model.parameters())
    # frozen-hidden pruning of the same model, for comparison
    frozen, _, _, _ = prune_and_check(model, x, ratio=RATIO)
    pruned, plan, graph, diff = prune_and_check(model, x, ratio=RATIO, prune_normalized=True)
    assert diff <= RTOL
    # every norm over the residual stream is now `expect` wide, and so are the embeddings
    norms = _norm_modules(pruned)
    assert norms and all(m.weight.shape == (expect,) for _, m in norms)
    assert all(tuple(m.normalized_shape) == (expect,) for _, m in norms if hasattr(m, "normalized_shape"))
    assert _embedding_width(pruned) == expect
    assert set(plan["norms"]) == {p for p, _ in norms}
    # parameters drop below the frozen-hidden pruning of the same ratio
    n_frozen = sum(p.numel() for p in frozen.parameters())
    n_pruned = sum(p.numel() for p in pruned.parameters())
    assert n_pruned < n_frozen < n_dense
    # the config follows (GPT-2 writes n_embd, which hidden_size maps to)
    assert pruned.config.hidden_size == expect
    # no hook left on the compacted model
    assert norm_masks(pruned) == {}
    assert all(not m._forward_hooks for _, m in pruned.named_modules())
    # exactness needs the kept-channel statistics: zeroing alone (hooks removed) is measurably different
    masked = mask_model(copy.deepcopy(model), plan)
    assert len(norm_masks(masked)) == len(norms)
    assert_outputs_close(masked, pruned, x)  # the oracle's rule: float64, relative to the outputs' magnitude
    assert remove_norm_masks(masked) == len(norms)
    # without them the outputs are off by more than 10% of their magnitude (measured: 15% to 20%)
    with pytest.raises(AssertionError, match=r"max\|a-b\|"):
        assert_outputs_close(masked, pruned, x, rtol=0.1)
    # secateur's own format: plan + safetensors, bit-identical outputs
    sc.save(pruned, tmp_path / "own", plan=plan)
    back = sc.load(tmp_path / "own").eval()
    with torch.no_grad():
        want = call_model(pruned, x).logits
        assert torch.equal(call_model(back, x).logits, want)
    if name == "llama":
        # LlamaConfig validates hidden_size % num_attention_heads == 0 when saved: 45 % 6 fails, so the
        # Hugging Face layout is tested with an explicit head_dim below
        return
    sc.save_pretrained(pruned, tmp_path / "hf", plan)
    back = sc.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(call_model(back, x).logits, want)
    assert back.config.hidden_size == expect
    # plain transformers: ViT reads head_dim from its config; BERT and GPT-2 derive hidden_size / heads
    loadable = json.loads((tmp_path / "hf" / "plan.json").read_text())["transformers_loadable"]
    assert loadable is (name == "vit")
    if loadable:
        plain = type(pruned).from_pretrained(tmp_path / "hf").eval()
        with torch.no_grad():
            assert torch.equal(call_model(plain, x).logits, want)


def _tiny_llama_head_dim():
    cfg = transformers.LlamaConfig(
        vocab_size=99,
        hidden_size=40,
        head_dim=8,  # explicit: 4 heads of 8 = 32, not the hidden size
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    ids = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    return transformers.LlamaForCausalLM(cfg).eval(), {"input_ids": ids, "use_cache": False}


def test_llama_hidden_pruned_loads_in_plain_transformers(tmp_path):
    """Llama reads head_dim from its config: hidden_size changes, head_dim stays, and plain
    ``LlamaForCausalLM.from_pretrained`` rebuilds the pruned model."""
    model, x = _tiny_llama_head_dim()
    pruned, plan, _, diff = prune_and_check(model, x, ratio=RATIO, prune_normalized=True)
    assert diff <= RTOL
    assert pruned.config.hidden_size == 40 - math.floor(RATIO * 40) == 28
    assert pruned.config.head_dim == 8
    assert pruned.model.layers[0].self_attn.q_proj.weight.shape == (32, 28)
    sc.save_pretrained(pruned, tmp_path, plan)
    assert json.loads((tmp_path / "plan.json").read_text())["transformers_loadable"] is True
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ours = sc.from_pretrained(tmp_path)
    with torch.no_grad():
        want = call_model(pruned, x).logits
        assert torch.equal(call_model(plain, x).logits, want)
        assert torch.equal(call_model(ours, x).logits, want)


def test_tied_lm_head_follows_the_hidden_dim():
    model, x = HF_MODELS["gpt2"]()
    model.eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    pruned, plan, _, _ = prune_and_check(model, x, ratio=RATIO, prune_normalized=True)
    assert pruned.lm_head.weight is pruned.transformer.wte.weight
    assert pruned.lm_head.weight.shape == (99, 32 - math.floor(RATIO * 32))
    assert pruned.lm_head.in_features == pruned.config.n_embd


# ------------------------------------------------------------------------------------------------------
# smaller models: weightless norms, GroupNorm(1, C), recognition, rollback
# ------------------------------------------------------------------------------------------------------
class PreNormBlock(nn.Module):
    """x -> x + fc2(relu(fc1(norm(x)))), then a final norm and a head: the width of x runs through norms."""

    def __init__(self, d=12, norm=None, final=None):
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.norm = norm if norm is not None else nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 16), nn.Linear(16, d)
        self.final = final if final is not None else nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.fc2(F.relu(self.fc1(self.norm(h))))
        return self.head(self.final(h))


def test_weightless_layer_norm_width_is_updated():
    m = PreNormBlock(
        norm=nn.LayerNorm(12, elementwise_affine=False), final=nn.RMSNorm(12, elementwise_affine=False)
    )
    x = torch.randn(4, 6, 5)
    pruned, plan, graph, diff = prune_and_check(m, x, ratio=0.5, prune_normalized=True)
    assert diff <= RTOL
    assert pruned.norm.normalized_shape == (6,) and pruned.final.normalized_shape == (6,)
    assert pruned.inp.out_features == 6
    assert set(plan["norms"]) == {"norm", "final"}
    assert all(len(s["kept"]) == 6 and s["size"] == 12 for s in plan["norms"].values())


class ConvGN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(1, 8)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(F.relu(self.gn(self.a(x)))).mean((2, 3))


def test_group_norm_one_group_prunes_channels():
    m, x = ConvGN(), torch.randn(2, 3, 6, 6)
    g = DependencyGraph.build(m, x).group_of("gn.weight", 0)
    assert g.n_prunable == 0 and any("one group" in r for r in g.reasons)
    pruned, plan, _, diff = prune_and_check(m, x, ratio=0.5, prune_normalized=True)
    assert diff <= RTOL
    assert pruned.gn.num_groups == 1 and pruned.gn.num_channels == 4 == pruned.a.out_channels


class ChannelsFirstLayerNorm(nn.Module):
    """A ConvNeXt-style norm over dim 1 whose name matches the pattern: the probe must reject it."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + 1e-6)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class GroupedRMSNorm(nn.Module):
    """Last-dim RMS norm in two groups: not permutation-equivariant, so not treated as a norm."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        g = x.unflatten(-1, (2, -1))
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * g.flatten(-2)


class GlobalLayerNorm(nn.Module):
    """Statistics over the whole tensor (rows mixed): not a last-dim norm."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.weight * (x - x.mean()) / x.std()


class ConvCF(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 7, 1)
        self.norm = ChannelsFirstLayerNorm(7)
        self.b = nn.Conv2d(7, 2, 1)

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


class ScaleNorm(nn.Module):
    """A last-dim norm whose name does not match the pattern: recognised once registered."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.weight * x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def test_probe_rejects_lookalikes_and_register_norm_accepts():
    assert probe_norm(ChannelsFirstLayerNorm(7)).startswith("probe raised RuntimeError")
    assert "changing one row changed other rows" in probe_norm(GlobalLayerNorm(8))
    assert "permutation" in probe_norm(GroupedRMSNorm(8))
    assert probe_norm(nn.LayerNorm(8)) is None and norm_kind(ChannelsFirstLayerNorm(7)) == "module"
    conv = ConvCF()
    g = DependencyGraph.build(conv, torch.randn(2, 3, 4, 4), prune_normalized=True).group_of("a.weight", 0)
    assert g.n_prunable == 0 and any("reduction over a channel dim" in r for r in g.reasons)
    assert norm_kind(ScaleNorm(8)) is None
    m = PreNormBlock(d=8, norm=GroupedRMSNorm(8), final=ScaleNorm(8))
    x = torch.randn(3, 4, 5)
    assert find_norms(m) == {}
    g = DependencyGraph.build(m, x, prune_normalized=True).group_of("inp.weight", 0)
    assert g.n_prunable == 0  # the grouped norm is traced inside as before: frozen by its mean
    register_norm(ScaleNorm)
    assert norm_kind(ScaleNorm(8)) == "module" and probe_norm(ScaleNorm(8)) is None
    m2 = PreNormBlock(d=8, norm=nn.LayerNorm(8), final=ScaleNorm(8))
    pruned, plan, _, diff = prune_and_check(m2, x, ratio=0.5, prune_normalized=True)
    assert diff <= RTOL and pruned.final.weight.shape == (4,) and set(plan["norms"]) == {"norm", "final"}


def test_compaction_removes_hooks_and_rolls_them_back():
    m, x = PreNormBlock(), torch.randn(2, 3, 5)
    graph = DependencyGraph.build(m, x, prune_normalized=True)
    gi = graph.groups.index(graph.group_of("inp.weight", 0))
    plan = make_plan(graph, {gi: [0, 3, 5]})
    masked = mask_model(copy.deepcopy(m), plan)
    before = {k: v.clone() for k, v in masked.state_dict().items()}
    hooks = norm_masks(masked)
    assert set(hooks) == {"norm", "final"}

    def boom(_):
        raise RuntimeError("check failed")

    with pytest.raises(CompactionError):
        compact(masked, plan, check=boom)
    assert norm_masks(masked) == hooks  # the same hook objects, back in place
    assert all(torch.equal(before[k], v) for k, v in masked.state_dict().items())
    ref = copy.deepcopy(masked)
    compact(masked, plan, check=lambda c: check_equivalence(ref, c, x))
    assert norm_masks(masked) == {} and masked.norm.weight.shape == (9,)


def test_set_norm_masks_validates_before_installing():
    m = PreNormBlock()
    with pytest.raises(CompactionError, match="'nope'"):
        spec = {"dim": -1, "size": 12, "kept": [0]}
        set_norm_masks(m, {"norm": spec, "nope": spec})
    with pytest.raises(CompactionError, match="'final'.*12 channels.*expects 10"):
        set_norm_masks(m, {"final": {"dim": -1, "size": 10, "kept": [0]}})
    assert norm_masks(m) == {}  # nothing installed by the failing calls


# ------------------------------------------------------------------------------------------------------
# prune, train with masks, compact
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_channel_pruner_train_then_compact_exact(name):
    torch.manual_seed(0)
    model, x = HF_MODELS[name]()
    model.train()
    h = _hidden(model)
    pruner = sc.ChannelPruner(
        model, x, schedule=RATIO, criterion="l1", allocation="uniform", prune_normalized=True
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(3):
        out = call_model(model, x).logits
        loss = out.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step(step)
        if step == 0:  # masks are on: norm hooks installed, removed channels of the norms output zero
            hooks = norm_masks(model)
            assert hooks and all(hk.kept.numel() == h - math.floor(RATIO * h) for hk in hooks.values())
            path = next(iter(hooks))
            seen = []
            hd = model.get_submodule(path).register_forward_hook(lambda m, a, o, seen=seen: seen.append(o))
            call_model(model, x)
            hd.remove()
            gone = np.setdiff1d(np.arange(h), hooks[path].kept.numpy())
            assert seen and not seen[0][..., torch.from_numpy(gone)].any()
    model.eval()
    pruned = pruner.finalize(verify=True)  # oracle (float64, 1e-6) inside the transaction
    assert pruned.config.hidden_size == h - math.floor(RATIO * h)
    assert norm_masks(pruned) == {}
    assert all(not m._forward_hooks for m in pruned.modules())


def test_config_hidden_size_only_when_every_residual_stream_agrees():
    """Whisper's encoder width reaches an output (frozen) and its decoder's is pruned: d_model keeps its
    value and the plan marks it inconsistent; the oracle still holds."""
    from secateur.pruners.oneshot import remove_units

    model, x = HF_MODELS["whisper"]()
    model.eval()
    graph = DependencyGraph.build(model, x, prune_normalized=True)
    dec = graph.group_of("model.decoder.layer_norm.weight", 0)
    enc = graph.group_of("model.encoder.layer_norm.weight", 0)
    assert dec.n_prunable == 32 and enc.n_prunable == 0
    pruned, plan = remove_units(model, graph, {graph.groups.index(dec): np.arange(5)}, x, verify=True)
    assert pruned.model.decoder.layer_norm.weight.shape == (27,) and pruned.config.d_model == 32
    assert plan["config"][""]["_inconsistent_d_model"] == [32, [27, 32]]


def test_save_pretrained_turns_transformers_config_refusal_into_a_named_error(tmp_path):
    """transformers 5 refuses a Llama config whose hidden size is not a multiple of the head count (even with
    an explicit head_dim); secateur says what to do instead, and writes nothing."""
    import transformers

    import secateur as sc
    from secateur.errors import SerializationError
    from secateur.pruners.oneshot import prune_channels

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=3, head_dim=8,
    )
    m = transformers.LlamaForCausalLM(cfg).eval()
    ids = {"input_ids": torch.randint(0, 64, (1, 8))}
    m, plan = prune_channels(m, ids, sparsity=0.3, criterion="l1", prune_normalized=True)
    assert m.config.hidden_size % 6 != 0
    with pytest.raises(SerializationError, match="round_to=.*secateur.save"):
        sc.save_pretrained(m, tmp_path / "hf", plan=plan)
    assert not (tmp_path / "hf" / "config.json").exists() and not (tmp_path / "hf" / "plan.json").exists()
