"""Model matrix: every zoo model and tiny Hugging Face models (random init, no downloads).

For each: 30% of the prunable units of every group removed by a random criterion, the forward works, the
oracle holds (compacted == masked in float64, per output ``max|a - b| <= 1e-6 * max(max|a|, max|b|)``:
relative, whatever the outputs' scale), parameters and MACs drop. A model we cannot prune is listed in
REFUSALS with the error it must raise (ConvNeXt-V2 with the defaults: every channel under a norm).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from graph_helpers import RTOL, assert_outputs_close, prune_and_check
from hf_models import HF_MODELS, HIDDEN_LEFT_WHOLE
from torch.utils.flop_counter import FlopCounterMode

from secateur._torch import call_model
from secateur.analysis.counting import frozen_parameters
from secateur.errors import GraphError
from secateur.pruners.channel import require_prunable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REFUSALS: dict[str, tuple[type, str]] = {
    # every channel is under a LayerNorm or a GRN (whose mean over channels a mask cannot reproduce); with
    # prune_normalized=True (test_hf_model_with_hidden_dims) it passes
    "convnextv2": (
        GraphError,
        r"nothing to prune .*'mean' in module 'convnextv2\.encoder\.stages\.0\.layers\.0\.grn'",
    ),
}


def _macs(model, x) -> int:
    with torch.no_grad(), frozen_parameters(model), FlopCounterMode(display=False) as fc:
        call_model(model, x)
    return fc.get_total_flops() // 2


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_prunable(model, x, ratio=0.3, skip_incompatible=False, **graph_kw):
    """``skip_incompatible``: groups whose removal breaks the model's own code are left whole (listed in
    ``plan["skipped"]``); the checks then hold for the rest."""
    model.eval()
    p0, m0 = _params(model), _macs(model, x)
    pruned, plan, graph, diff = prune_and_check(
        model, x, ratio=ratio, criterion="random", skip_incompatible=skip_incompatible, **graph_kw
    )
    require_prunable(graph)  # a named refusal (GraphError) when every group is frozen
    assert diff <= RTOL  # worst max|a - b| / max(max|a|, max|b|) over the outputs: relative, scale-free
    assert _params(pruned) < p0
    assert _macs(pruned, x) < m0
    # 30% of the prunable units of the largest prunable group (not left whole) went
    skipped = plan.get("skipped", {})
    g = max((g for g in graph.prunable_groups() if g.name not in skipped), key=lambda g: g.n_prunable)
    removed = next(r["removed"] for r in plan["groups"] if r["group"] == g.name)
    assert len(removed) == int(ratio * g.n_prunable + 1e-9)
    return pruned, plan


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_hf_model(name):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, x = HF_MODELS[name]()
    if name in REFUSALS:
        err, match = REFUSALS[name]
        with pytest.raises(err, match=match):
            assert_prunable(model, x)
        return
    assert_prunable(model, x)


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_hf_model_with_hidden_dims(name):
    """The same checks with dims normalised by LayerNorm/RMSNorm prunable (the hidden size): exact because the
    masks compute the norms' statistics over the kept channels (secateur.compact.norms)."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, x = HF_MODELS[name]()
    token_norms = any(
        isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith("RMSNorm") for m in model.modules()
    )
    _, plan = assert_prunable(model, x, prune_normalized=True)
    # T5/CLIP: the hidden size reaches an output; HIDDEN_LEFT_WHOLE: named in hf_models (test_hf_reload.py)
    if token_norms and name not in ("t5", "clip", "convnext", *HIDDEN_LEFT_WHOLE):
        assert plan.get("norms"), f"{name}: no normalisation layer was narrowed"


def _zoo_names() -> list[str]:
    try:
        from secateur.zoo import list_models
    except ImportError:
        return []
    return list_models()


@pytest.mark.parametrize("name", _zoo_names())
def test_zoo_model(name):
    from secateur.zoo import create_model

    torch.manual_seed(0)
    model = create_model(name)
    _, plan = assert_prunable(model, torch.randn(2, 1, 28, 28))
    assert plan["groups"], f"nothing was pruned in zoo model {name}"


def test_the_equivalence_check_is_relative_to_the_outputs_scale():
    """assert_prunable's check never depends on the outputs' scale: logits scaled by 1e12 (float64 rounding
    alone is then far above an absolute 1e-6) pass, and a 1% difference on outputs of size 1e-10 (far below
    an absolute 1e-6) fails."""
    from torch import nn

    from secateur.zoo import create_model

    class Scaled(nn.Module):
        def __init__(self, inner: nn.Module, factor: float) -> None:
            super().__init__()
            self.inner, self.factor = inner, factor

        def forward(self, x):
            return self.inner(x) * self.factor

    torch.manual_seed(0)
    assert_prunable(Scaled(create_model("resnet8"), 1e12), torch.randn(2, 1, 28, 28))
    tiny = Scaled(nn.Linear(4, 3), 1e-10).eval()
    off = copy.deepcopy(tiny)
    with torch.no_grad():
        off.inner.weight.mul_(1.01)
        off.inner.bias.mul_(1.01)
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert (tiny(x).double() - off(x).double()).abs().max() < 1e-6  # an absolute check would pass
    with pytest.raises(AssertionError, match="max"):
        assert_outputs_close(tiny, off, x)
    assert assert_outputs_close(tiny, copy.deepcopy(tiny), x) == 0.0


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
def test_hf_save_pretrained_round_trip(tmp_path, name):
    """Head counts, head_dim and intermediate_size land in the config: from_pretrained rebuilds the model.
    (50%: Llama's config validator wants hidden_size divisible by the head count.)"""
    torch.manual_seed(0)
    model, x = HF_MODELS[name]()
    pruned, plan = assert_prunable(model, x, ratio=0.5)
    pruned.save_pretrained(tmp_path)
    again = type(pruned).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        a = call_model(pruned.eval(), x).logits
        b = call_model(again, x).logits
    assert torch.allclose(a, b, atol=1e-6)
    assert again.config.num_attention_heads == plan["config"][""]["num_attention_heads"][1]


def test_outputs_with_a_kv_cache_are_traced_and_the_cache_is_not_protected():
    """use_cache=True returns a Cache object: it is not an output to protect, heads stay prunable."""
    torch.manual_seed(0)
    model, x = HF_MODELS["llama"]()
    x = {**x, "use_cache": True}
    from secateur.graph import DependencyGraph

    g = DependencyGraph.build(model.eval(), x)
    heads = g.group_of("model.layers.0.self_attn.k_proj.weight", 0)
    assert heads is not None and heads.n_prunable == 4
    pruned, plan, _, diff = prune_and_check(model, {**x, "use_cache": False}, ratio=0.5)
    out = call_model(pruned, x)
    assert out.past_key_values is not None
