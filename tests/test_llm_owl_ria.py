"""OWL (outlier-weighted layer-wise sparsity) and RIA (relative importance and activations) through the
one-shot drivers, on a tiny random Gemma 3 decoder built from a config and on a small MLP.

What is checked: OWL's sparsities have the target (size-weighted) mean, the reverse order of the outlier
ratios and a spread of 2 lambda; the ratios equal ``mean(A > M mean(A))`` of Wanda scores computed here in
float64; OWL is the uniform driver with per-unit sparsities (same masks as passing them explicitly; lam=0 is
uniform); OWL with magnitude and SparseGPT follows the same allocation; N:M with OWL is refused. RIA's
scores equal eq. 1-2 written out entry by entry in float64; its kept weights are the top per layer / per
row / per N:M group; the element criterion "ria" gives the same scores; through ``prune_oneshot`` with
2:4 every group keeps 2.
"""

import copy
import math

import pytest
import torch
from torch import nn

from secateur.criteria import get_criterion
from secateur.errors import ConfigError
from secateur.llm import (
    OWL,
    collect_linear_inputs,
    layer_outlier_ratio,
    outlier_ratio,
    owl_sparsities,
    prune_linears,
    prune_oneshot,
    relative_importance,
    ria_mask,
    ria_scores,
)
from secateur.llm.oneshot import block_call_args
from secateur.masks.element import get_mask, has_mask
from secateur.masks.patterns import check_nm_mask
from secateur.scope import Scope

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
OUTLIER_COLUMNS = (0, 1, 4, 2)  # how many input columns of each block's q/up projections get outliers


def tiny_gemma() -> nn.Module:
    """4 blocks; block b has ``OUTLIER_COLUMNS[b]`` input columns scaled x30 (distinct outlier ratios)."""
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=4, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention"] * 2,
    )
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for b, k in enumerate(OUTLIER_COLUMNS):
            block = model.model.layers[b]
            block.self_attn.q_proj.weight[:, :k] *= 30
            block.mlp.up_proj.weight[:, 2 : 2 + k] *= 30
    return model


def calibration() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    second = torch.randint(3, 64, (2, 10), generator=g)
    return [
        {"input_ids": ids, "attention_mask": mask},
        {"input_ids": second, "attention_mask": torch.ones_like(second)},
    ]


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: get_mask(m).clone() for n, m in model.named_modules() if has_mask(m)}


def wanda64(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Wanda scores in float64 from a Linear's inputs ``x`` (tokens, in)."""
    return weight.detach().double().abs() * x.double().pow(2).sum(0).sqrt()


# --------------------------------------------------------------------------------------------- OWL


def test_owl_sparsities_mean_order_and_spread():
    ratios = [0.010, 0.002, 0.030, 0.002, 0.020]
    s, lam = 0.7, 0.08
    out = owl_sparsities(ratios, s, lam)
    assert sum(out) / len(out) == pytest.approx(s, abs=1e-12)
    assert max(out) - min(out) == pytest.approx(2 * lam, abs=1e-12)
    for i in range(5):
        for j in range(5):
            if ratios[i] > ratios[j]:
                assert out[i] < out[j]
            elif ratios[i] == ratios[j]:
                assert out[i] == out[j]
    # The reference mapping written out: a linear map of D onto [0, 2 lam], recentred on the target.
    lo, hi = min(ratios), max(ratios)
    shifted = [2 * lam * (r - lo) / (hi - lo) for r in ratios]
    expected = [s - (v - sum(shifted) / 5) for v in shifted]
    assert out == pytest.approx(expected, abs=1e-12)
    # Weighted by layer sizes, the pruned fraction of the whole is the target.
    sizes = [10, 40, 20, 5, 25]
    weighted = owl_sparsities(ratios, s, lam, sizes)
    assert sum(w * n for w, n in zip(weighted, sizes)) / sum(sizes) == pytest.approx(s, abs=1e-12)
    assert owl_sparsities([0.1, 0.1, 0.1], 0.5) == [0.5, 0.5, 0.5]
    assert owl_sparsities(ratios, s, 0.0) == [s] * 5
    with pytest.raises(ConfigError, match="gives block.1 a sparsity"):
        owl_sparsities([0.0, 1.0], 0.05, 0.08, names=["block.0", "block.1"])
    for bad in (dict(m=0), dict(m=float("nan")), dict(lam=0.5), dict(lam=-0.1)):
        with pytest.raises(ConfigError, match="OWL"):
            OWL(**bad)


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 20.0]])  # mean 3.375: only 20 > 5 * 3.375
    assert outlier_ratio(scores, 5.0) == 1 / 8
    assert outlier_ratio([scores[:1], scores[1:]], 5.0) == 1 / 8  # several tensors: one layer together
    assert outlier_ratio(scores, 2.0) == 1 / 8 and outlier_ratio(scores, 0.1) == 1.0
    w = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    x = torch.tensor([3.0, 1.0])
    assert layer_outlier_ratio([w], [x], 1.0) == outlier_ratio((w.abs() * x).double(), 1.0)


@pytest.fixture(scope="module")
def dense_inputs():
    """Every Linear's inputs on the dense tiny Gemma (padding removed): the OWL dense pass, recomputed."""
    return collect_linear_inputs(tiny_gemma(), calibration(), stop_early=False)


def test_owl_block_ratios_and_allocation_through_prune_oneshot(dense_inputs):
    model, data = tiny_gemma(), calibration()
    dense = copy.deepcopy(model)
    report = prune_oneshot(model, data, "wanda", 0.6, allocation="owl")
    assert report.allocation == "owl" and report.units == [f"model.layers.{b}" for b in range(4)]
    # D_l: fraction of the block's Wanda scores (all seven Linears together) above 5x their mean, float64.
    for b, got in enumerate(report.outlier_ratios):
        names = [f"model.layers.{b}.{n}" for n in LINEARS]
        scores = [wanda64(dense.get_submodule(n).weight, dense_inputs[n]) for n in names]
        flat = torch.cat([s.flatten() for s in scores])
        assert got == float((flat > 5 * flat.mean()).double().mean())
    ratios, sps = report.outlier_ratios, report.unit_sparsities
    assert len(set(ratios)) == 4  # the injected outliers make every block different
    assert sum(sps) / 4 == pytest.approx(0.6, abs=1e-12)  # equal block sizes: the plain mean
    assert [sorted(ratios).index(r) for r in ratios] == [sorted(sps, reverse=True).index(s) for s in sps]
    assert max(sps) - min(sps) == pytest.approx(0.16, abs=1e-12)
    # Each Linear of block b pruned floor(s_b * in) per row.
    for layer in report.layers:
        b = int(layer.name.split(".")[2])
        assert layer.sparsity == pytest.approx(math.floor(sps[b] * layer.shape[1]) / layer.shape[1], abs=1e-6)
    # OWL = the uniform driver with these per-block sparsities: the same masks.
    given = copy.deepcopy(dense)
    again = prune_oneshot(given, data, "wanda", 0.6, allocation=sps)
    assert again.allocation == "given" and again.unit_sparsities == sps
    assert masks_equal(masks_of(given), masks_of(model))
    # lambda = 0: every block gets the target, as uniform.
    uni, zero = copy.deepcopy(dense), copy.deepcopy(dense)
    prune_oneshot(uni, data, "wanda", 0.6)
    prune_oneshot(zero, data, "wanda", 0.6, allocation=OWL(lam=0.0))
    assert masks_equal(masks_of(uni), masks_of(zero))
    assert not masks_equal(masks_of(uni), masks_of(model))


def masks_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt", "ria"])
def test_owl_allocation_is_the_same_for_every_method(method):
    model, data = tiny_gemma(), calibration()
    dense = copy.deepcopy(model)
    ref = prune_oneshot(copy.deepcopy(dense), data, "wanda", 0.5, allocation="owl")
    report = prune_oneshot(model, data, method, 0.5, allocation="owl")
    # The ratios come from the dense model's Wanda scores whatever the method.
    assert report.outlier_ratios == ref.outlier_ratios and report.unit_sparsities == ref.unit_sparsities
    for layer in report.layers:
        s = report.unit_sparsities[int(layer.name.split(".")[2])]
        out_f, in_f = layer.shape
        # SparseGPT: an exact count per layer; the others: per row.
        n = out_f * in_f if method == "sparsegpt" else in_f
        want = math.floor(s * n) / n
        assert layer.sparsity == pytest.approx(want, abs=1e-6)
        if method == "magnitude":  # the lowest |w| of each row, by an independent argsort
            w = dense.get_submodule(layer.name).weight.detach().double().abs()
            keep = torch.ones_like(w, dtype=torch.bool)
            keep.scatter_(1, torch.argsort(w, dim=1, stable=True)[:, : math.floor(s * in_f)], False)
            assert torch.equal(get_mask(model.get_submodule(layer.name)), keep)


def test_owl_refusals_leave_the_model_untouched():
    model, data = tiny_gemma(), calibration()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [
        (dict(pattern="2:4", allocation="owl"), "N:M model has sparsity 1 - N/M"),
        (dict(pattern="2:4", allocation=[0.5] * 4), "cannot express"),
        (dict(allocation="owll"), "unknown one-shot allocation"),
        (dict(allocation=[0.5, 0.5]), "2 sparsities for 4 units"),
        (dict(allocation=[0.5, 0.5, 1.0, 0.5]), "model.layers.2"),
        (dict(sparsity=0.05, allocation="owl"), "outside \\[0, 1\\)"),
    ]
    for kwargs, msg in cases:
        kw = {"method": "wanda", "sparsity": 0.5, **kwargs}
        with pytest.raises(ConfigError, match=msg):
            prune_oneshot(model, data, **kw)
        assert not masks_of(model)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_owl_in_prune_linears_treats_each_linear_as_a_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8))
    with torch.no_grad():
        model[2].weight[:, :3] *= 25  # outliers in the middle layer
    x = torch.randn(64, 16)
    dense = copy.deepcopy(model)
    report = prune_linears(model, x, "wanda", 0.5, allocation=OWL(m=3.0, lam=0.1))
    assert report.units == ["0", "2", "4"]
    inputs = {}
    hooks = [dense[i].register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(str(i), a[0].detach()))
             for i in (0, 2, 4)]
    dense(x)
    for h in hooks:
        h.remove()
    for name, got in zip(report.units, report.outlier_ratios):
        s = wanda64(dense.get_submodule(name).weight, inputs[name])
        assert got == float((s > 3.0 * s.mean()).double().mean())
    sizes = [16 * 32, 32 * 24, 24 * 8]
    sps = report.unit_sparsities
    assert sum(s * n for s, n in zip(sps, sizes)) / sum(sizes) == pytest.approx(0.5, abs=1e-12)
    ratios = report.outlier_ratios
    assert len(set(ratios)) == 3
    assert [sorted(ratios).index(r) for r in ratios] == [sorted(sps, reverse=True).index(s) for s in sps]
    given = copy.deepcopy(dense)
    prune_linears(given, x, "wanda", 0.5, allocation=sps)
    assert masks_equal(masks_of(given), masks_of(model))
    with pytest.raises(ConfigError, match="3 units"):
        prune_linears(copy.deepcopy(dense), x, "wanda", 0.5, allocation=[0.5])


def test_each_block_is_calibrated_with_its_own_call_arguments(dense_inputs):
    """Gemma 3 hands sliding-window and full-attention blocks different masks and rotary embeddings: block 1
    (full attention) pruned alone sees exactly the dense model's inputs, not block 0's arguments."""
    model, data = tiny_gemma(), calibration()
    dense = copy.deepcopy(model)
    first, args = block_call_args(model, model.model.layers, data)
    assert len(first) == 2 and all(len(a) == 2 for a in args)
    sliding, full = args[0][0][1], args[1][0][1]
    assert sliding["attention_mask"] is not full["attention_mask"]
    assert sliding["attention_mask"] is args[2][0][1]["attention_mask"]  # both sliding
    assert torch.equal(first[0], dense.model.embed_tokens(data[0]["input_ids"]))
    prune_oneshot(model, data, "wanda", 0.5, include=r"layers\.1\.")
    for n in LINEARS:
        name = f"model.layers.1.{n}"
        s = wanda64(dense.get_submodule(name).weight, dense_inputs[name])
        want = torch.ones_like(s, dtype=torch.bool)
        want.scatter_(1, torch.argsort(s, dim=1, stable=True)[:, : s.shape[1] // 2], False)
        assert torch.equal(get_mask(model.get_submodule(name)), want), name
    assert block_call_args(model, model.model.layers, data)[1][1][0][1]["attention_mask"] is not None
    assert all(type(b).forward is b.forward.__func__ for b in model.model.layers)  # forwards restored


# --------------------------------------------------------------------------------------------- RIA


def ria_by_hand(w: torch.Tensor, norms: torch.Tensor, a: float) -> torch.Tensor:
    """Eq. 1-2 entry by entry in float64."""
    out_f, in_f = w.shape
    s = torch.zeros(out_f, in_f, dtype=torch.float64)
    for i in range(out_f):
        for j in range(in_f):
            col = sum(abs(float(w[k, j])) for k in range(out_f))
            row = sum(abs(float(w[i, k])) for k in range(in_f))
            ri = (abs(float(w[i, j])) / col if col else 0.0) + (abs(float(w[i, j])) / row if row else 0.0)
            s[i, j] = ri * float(norms[j]) ** a
    return s


def test_ria_scores_equal_the_formula():
    w = torch.tensor([[0.5, -1.0, 2.0, 0.0], [3.0, 0.25, -0.5, 1.0], [-1.5, 2.0, 0.0, 0.75]])
    norms = torch.tensor([4.0, 1.0, 9.0, 0.25])
    for a in (0.5, 1.0, 0.0):
        torch.testing.assert_close(ria_scores(w, norms, a), ria_by_hand(w, norms, a), rtol=1e-14, atol=0)
    torch.testing.assert_close(relative_importance(w), ria_by_hand(w, torch.ones(4), 0.0), rtol=1e-14, atol=0)
    # A zero row and a zero column give 0, not NaN.
    z = w.clone()
    z[1] = 0
    z[:, 2] = 0
    got = ria_scores(z, norms)
    assert torch.isfinite(got).all() and (got[1] == 0).all() and (got[:, 2] == 0).all()
    torch.testing.assert_close(got, ria_by_hand(z, norms, 0.5), rtol=1e-14, atol=0)
    for bad, msg in [((w, torch.ones(3)), "do not fit"), ((w[0], norms), "2-D"), ((w, -norms), ">= 0")]:
        with pytest.raises(ConfigError, match=msg):
            ria_scores(*bad, layer="blk.q")


def test_ria_masks_keep_the_top_scores_per_layer_row_and_group():
    torch.manual_seed(0)
    w, norms = torch.randn(8, 16), torch.rand(16) * 3
    s = ria_by_hand(w, norms, 0.5)
    keep = ria_mask(w, norms, 0.5, "layer")  # the paper's comparison
    k = math.floor(0.5 * s.numel())
    want = torch.ones(s.numel(), dtype=torch.bool)
    want[torch.argsort(s.flatten(), stable=True)[:k]] = False
    assert torch.equal(keep, want.view_as(s))
    keep = ria_mask(w, norms, 0.25, "row")
    want = torch.ones_like(s, dtype=torch.bool)
    want.scatter_(1, torch.argsort(s, dim=1, stable=True)[:, :4], False)
    assert torch.equal(keep, want)
    keep = ria_mask(w, norms, pattern="2:4")
    assert check_nm_mask(keep, 2, 4)
    groups, kept = s.view(8, 4, 4), keep.view(8, 4, 4)
    assert torch.equal(kept, groups >= groups.topk(2, dim=-1).values[..., -1:])


def test_ria_through_prune_oneshot_and_the_element_criterion(dense_inputs):
    model, data = tiny_gemma(), calibration()
    dense = copy.deepcopy(model)
    prune_oneshot(model, data, "ria", 0.5, "layer")
    # Block 0 sees the dense embeddings: its masks are RIA's top half per layer from independent norms.
    for n in LINEARS:
        name = f"model.layers.0.{n}"
        w = dense.get_submodule(name).weight
        s = ria_scores(w, dense_inputs[name].double().pow(2).sum(0).sqrt())
        k = math.floor(0.5 * s.numel())
        want = torch.ones(s.numel(), dtype=torch.bool)
        want[torch.argsort(s.flatten(), stable=True)[:k]] = False
        assert torch.equal(get_mask(model.get_submodule(name)), want.view_as(s)), name
    nm = copy.deepcopy(dense)
    report = prune_oneshot(nm, data, "ria", pattern="2:4")
    assert all(check_nm_mask(get_mask(nm.get_submodule(r.name)), 2, 4) for r in report.layers)
    assert len(report.layers) == 4 * len(LINEARS)
    # The registered element criterion gives the same scores from the same data (one pass, whole model).
    targets = Scope(include=["model.layers.0.*"], types=(nn.Linear,)).resolve(dense)
    crit = get_criterion("ria", {"model": dense, "data": data})
    scores = crit.scores(targets)
    for t in targets:
        want = ria_scores(t.module.weight, dense_inputs[t.path].double().pow(2).sum(0).sqrt())
        torch.testing.assert_close(scores[t.name], want, rtol=1e-12, atol=0)
    with pytest.raises(ConfigError, match="needs data"):
        get_criterion("ria", {"model": dense})
    emb = Scope(include=["model.embed_tokens"], types=(nn.Embedding,)).resolve(dense)
    with pytest.raises(ConfigError, match="restrict the scope's types to Linear"):
        crit.scores(emb)
