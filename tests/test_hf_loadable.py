"""Issue 17: pruned Hugging Face models that plain transformers reloads, or a named refusal.

- ``prune_channels(..., loadable=True)`` / ``prune_heads(..., loadable=True)``: uniform per-layer counts,
  GQA-safe head units (a KV head with its query heads), MLP widths rounded to 8 by default; transformers' own
  ``model.save_pretrained`` then ``AutoModelForCausalLM.from_pretrained`` give bit-identical logits. Shapes a
  family's config cannot express are refused before anything changes, naming the config field.
- Without ``loadable``, a model whose config cannot describe it gets a ``save_pretrained`` that refuses
  (``UnloadableConfigError``) instead of writing a stale ``config.json``; ``secateur.save_pretrained`` still
  writes a folder ``secateur.from_pretrained`` rebuilds bit-exactly.
- Falcon's fused QKV projections (multi-query, and the new decoder architecture's grouped layout) lose query
  heads evenly per KV group (``prune_decoder(gqa="query_heads")``), every KV head kept.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import secateur as sc
from secateur._torch import call_model
from secateur.errors import ConfigError
from secateur.llm import UnloadableConfigError, prune_decoder
from secateur.llm.loadable import UnloadableShapeError, plain_save_problems
from secateur.pruners.heads import prune_heads

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent / "graph"))
from hf_models import HF_MODELS  # noqa: E402

_HEAD_OWNERS = ["*pooler*", "*classifier*", "*score*"]


def _build(name: str):
    torch.manual_seed(0)
    model, x = HF_MODELS[name]()
    return model.eval(), x


def _logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return call_model(model.eval(), x).logits


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, before: dict[str, torch.Tensor], config: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert model.config.to_dict() == config
    assert "save_pretrained" not in model.__dict__


def _plain_reload(model, x, folder: Path) -> None:
    """transformers' own save_pretrained and AutoModelForCausalLM.from_pretrained: same class, same logits."""
    model.save_pretrained(folder)
    again = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert type(again) is type(model)
    assert torch.equal(_logits(again, x), _logits(model, x))


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "falcon", "falcon_gqa"])
def test_prune_channels_loadable_reloads_in_plain_transformers_with_widths_multiple_of_8(tmp_path, name):
    model, x = _build(name)
    dense = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # 30% of 64 MLP channels: 45 kept with round_to=1, a multiple of 8 with loadable's default
    pruned, plan = sc.prune_channels(model, x, 0.3, criterion="l1", loadable=True)
    shrunk = [
        (k, d, n, dense[k][d])
        for k, v in pruned.state_dict().items()
        for d, n in enumerate(v.shape)
        if n < dense[k][d]
    ]
    assert shrunk, f"{name}: nothing was pruned"
    assert all(n % 8 == 0 for _, _, n, _ in shrunk), shrunk  # round_to=8 by default with loadable=True
    assert not plain_save_problems(pruned)  # its config describes it: plain save allowed
    _plain_reload(pruned, x, tmp_path)


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
def test_prune_heads_loadable_keeps_the_query_per_kv_ratio_and_reloads(tmp_path, name):
    model, x = _build(name)
    rep = model.config.num_attention_heads // model.config.num_key_value_heads
    pruned, plan = prune_heads(model, x, 0.5, criterion="l1", loadable=True)
    heads = plan["config"][""]["num_attention_heads"]
    kv = plan["config"][""]["num_key_value_heads"]
    assert heads[1] < heads[0] and kv[1] < kv[0]
    assert heads[1] == kv[1] * rep  # whole KV groups went with their query heads
    head_dim = pruned.config.head_dim
    for layer in pruned.model.layers:
        attn = layer.self_attn
        assert attn.q_proj.out_features == heads[1] * head_dim
        assert attn.k_proj.out_features == kv[1] * head_dim
        assert attn.num_key_value_groups == rep
    _plain_reload(pruned, x, tmp_path)


@pytest.mark.parametrize(
    ("name", "call", "kwargs", "match"),
    [
        ("gpt2", "heads", {}, r"num_attention_heads \(4 -> 2\): gpt2 derives the head size as n_embd"),
        ("bert", "heads", {}, r"num_attention_heads \(4 -> 2\): bert derives the head size"),
        ("bloom", "channels", {}, r"hidden_size \(32\): bloom builds its MLP as 4 x hidden_size"),
        (
            "bert",
            "channels",
            {},
            r"no config field of bert sets the pruned width of bert\.pooler\.dense\.bias.*protect=",
        ),
        ("llama", "channels", {"protect": ["model.layers.0.mlp*"]}, r"intermediate_size: the layers would"),
        (
            "deberta_v2",
            "channels",
            {"protect": ["*pooler*", "*classifier*"]},
            r"sets the pruned width of deberta\.encoder\.layer\.0\.attention\.self\.pos_key_proj.*protect=",
        ),
    ],
)
def test_loadable_refuses_unexpressible_shapes_by_field_and_leaves_the_model_untouched(
    name, call, kwargs, match
):
    model, x = _build(name)
    before, config = _state(model), model.config.to_dict()
    fn = prune_heads if call == "heads" else sc.prune_channels
    with pytest.raises(UnloadableShapeError, match=match) as info:
        fn(model, x, 0.5, criterion="l1", loadable=True, **kwargs)
    assert "Nothing was changed" in str(info.value)
    _assert_untouched(model, before, config)


def test_loadable_bad_requests_are_named_before_anything_changes():
    model, x = _build("llama")
    before, config = _state(model), model.config.to_dict()
    with pytest.raises(ConfigError, match="allocation='uniform'"):
        sc.prune_channels(model, x, 0.5, allocation="global", loadable=True)
    with pytest.raises(ConfigError, match="skip_incompatible"):
        sc.prune_channels(model, x, 0.5, skip_incompatible=True, loadable=True)
    # round_to=1 at 30%: 8 -> 6 query heads over 4 -> 3 KV heads, which transformers' validator rejects
    with pytest.raises(UnloadableShapeError, match=r"not a multiple of the number of attention heads \(6\)"):
        sc.prune_channels(model, x, 0.3, criterion="l1", round_to=1, loadable=True)
    _assert_untouched(model, before, config)
    with pytest.raises(ConfigError, match="Sequential is not a Hugging Face PreTrainedModel"):
        sc.prune_channels(
            nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(3, 4), 0.5, loadable=True
        )


def test_plain_save_of_an_unexpressible_prune_is_refused_and_secateur_save_reloads(tmp_path):
    """After prune_heads on GPT-2 (head size derived as n_embd / n_head), transformers' own save_pretrained
    would write a config.json that builds other shapes: it refuses by name and writes nothing, also on a deep
    copy; secateur.save_pretrained writes a folder secateur.from_pretrained rebuilds bit-exactly."""
    model, x = _build("gpt2")
    pruned, plan = prune_heads(model, x, 0.5, criterion="l1")
    want = _logits(pruned, x)
    for m in (pruned, copy.deepcopy(pruned)):
        with pytest.raises(
            UnloadableConfigError, match=r"num_attention_heads \(4 -> 2\).*Nothing was written"
        ):
            m.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    sc.save_pretrained(pruned, tmp_path / "sc", plan)
    assert torch.equal(_logits(sc.from_pretrained(tmp_path / "sc"), x), want)
    # a shape the config describes (MLP only) gets no refusal: transformers' own save_pretrained stays
    fresh, x = _build("gpt2")
    fresh, _ = sc.prune_channels(fresh, x, 0.5, criterion="l1", protect=["*attn*"])
    assert not plain_save_problems(fresh)
    # the guard checks at save time and then saves with the class's own method; a deep copy guards itself
    twin = copy.deepcopy(fresh)
    assert twin.__dict__["save_pretrained"].model is twin
    twin.save_pretrained(tmp_path / "plain_ok")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain_ok")
    assert torch.equal(_logits(again, x), _logits(fresh, x))


@pytest.mark.parametrize(("name", "kv"), [("falcon", 1), ("falcon_gqa", 2)])
def test_falcon_fused_qkv_loses_query_heads_evenly_per_kv_group(tmp_path, name, kv):
    """Falcon's fused query_key_value (multi-query: [4 queries, k, v]; new decoder architecture: 2 KV groups
    of [2 queries, k, v]) loses half its query heads, every KV head kept; the oracle checked the compaction.
    The config derives the head size as hidden_size / num_attention_heads, so plain save is refused naming
    num_attention_heads, uniform=True refuses before changing anything, and secateur's folder reloads."""
    model, x = _build(name)
    before, config = _state(model), model.config.to_dict()
    data = [x["input_ids"]]
    with pytest.raises(ConfigError, match="num_attention_heads"):
        prune_decoder(model, data, {"heads": 0.5}, what=("heads",), gqa="query_heads", uniform=True)
    _assert_untouched(model, before, config)
    pruned, plan = prune_decoder(
        model, data, {"heads": 0.5}, what=("heads",), layers=[0, 1], gqa="query_heads"
    )
    assert plan["config"][""]["num_attention_heads"] == [4, 2]
    head_dim = 32 // 4
    for block in pruned.transformer.h:
        attn = block.self_attention
        assert attn.num_heads == 2 and attn.num_heads % kv == 0
        assert attn.num_key_value_groups == 2 // kv
        assert attn.query_key_value.out_features == (2 + 2 * kv) * head_dim  # keys and values whole
        assert attn.dense.in_features == 2 * head_dim
    with pytest.raises(UnloadableConfigError, match=r"num_attention_heads \(4 -> 2\): falcon derives"):
        pruned.save_pretrained(tmp_path / "plain")
    sc.save_pretrained(pruned, tmp_path / "sc", plan)
    assert torch.equal(_logits(sc.from_pretrained(tmp_path / "sc"), x), _logits(pruned, x))


def test_falcon_fused_multi_head_attention_has_no_query_heads_to_remove_evenly():
    """Falcon's new decoder architecture with as many KV heads as query heads (n_rep 1) is multi-head
    attention: gqa='query_heads' names that instead of misreading the fused layout."""
    cfg = transformers.FalconConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_kv_heads=4,
        new_decoder_architecture=True,
        ffn_hidden_size=64,
    )
    torch.manual_seed(0)
    model = transformers.FalconForCausalLM(cfg).eval()
    ids = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="gqa='query_heads': no grouped-query attention"):
        prune_decoder(model, [ids], {"heads": 0.5}, what=("heads",), layers=[0, 1], gqa="query_heads")


def test_channel_pruner_finalize_refuses_a_plain_save_its_config_cannot_describe(tmp_path):
    """ChannelPruner's global allocation leaves GPT-2's MLP layers at different widths, which one
    ``n_inner`` cannot describe: after finalize, transformers' own save_pretrained refuses and writes nothing,
    while secateur.save_pretrained / from_pretrained round-trip bit-exactly."""
    from secateur.pruners.channel import ChannelPruner

    model, x = _build("gpt2")
    pruner = ChannelPruner(model, x, schedule=0.4, criterion="l1", protect=["*attn*"], allocation="global")
    pruner.prune_to(0.4)
    pruned = pruner.finalize()
    widths = {m.c_fc.weight.shape[1] for m in pruned.transformer.h.modules() if hasattr(m, "c_fc")}
    assert len(widths) > 1, widths  # the case under test: per-layer widths one config value cannot hold
    with pytest.raises(UnloadableConfigError, match="Nothing was written"):
        pruned.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    sc.save_pretrained(pruned, tmp_path / "sc", pruner.plan)
    assert torch.equal(_logits(sc.from_pretrained(tmp_path / "sc"), x), _logits(pruned, x))


def test_prune_heads_on_a_multi_query_model_names_the_way_in() -> None:
    """One KV head serves every query head: prune_heads has no head unit to remove (it would be the whole
    layer) and says to remove query heads with prune_decoder instead; the model is left as it was."""
    model, x = _build("falcon")
    before, config = _state(model), model.config.to_dict()
    with pytest.raises(ConfigError, match=r"multi-query.*prune_decoder\(model, data, gqa='query_heads'\)"):
        prune_heads(model, x, sparsity=0.5)
    _assert_untouched(model, before, config)
