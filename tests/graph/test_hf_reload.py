"""Pruned Hugging Face models reload in plain transformers whenever their config can express them (issue 17).

For every decoder LM and text encoder of the matrix (hf_models.DECODER_LMS, ENCODERS):

- MLP channels pruned by half (attention, pooler and classifier left whole): ``secateur.save_pretrained(...,
  require_loadable=True)`` writes a folder that plain ``transformers.AutoModel*.from_pretrained`` loads with
  bit-identical logits, except where the family's config has no MLP-width field (Bloom, MPT: ``4 x hidden``),
  which is refused by a named ``UnloadableConfigError`` before anything is written.
- heads pruned by half (MLP left whole): the families that read ``head_dim`` reload bit-exactly; those that
  derive the head size as ``hidden / heads`` are refused naming ``num_attention_heads``; those whose heads
  the graph leaves whole (fused QKV layouts, per-projection q/k norms) are asserted as such (a named
  GraphError), never skipped.
- ``secateur.from_pretrained`` rebuilds every refused model bit-exactly.

- ``prune_channels(..., loadable=True)``: the loadability predicted from the plan before pruning holds after
  it, for every family; Bloom, MPT (MLP of ``4 x hidden``) and DeBERTa-v2 (relative-position projections of
  hidden width) are refused naming the field, the model untouched.

Plus the architectures whose ops have no coupling rule yet (hf_models.HF_PENDING_RULES), and BERT's hidden
size pruned in proportion to its heads (a consistent config) vs not (refused naming the field).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from hf_models import DECODER_LMS, ENCODERS, HF_MODELS, HF_PENDING_RULES, HIDDEN_LEFT_WHOLE

import secateur as sc
from secateur._torch import call_model
from secateur.errors import GraphError, UnsupportedOpError
from secateur.io import transformers_loadable
from secateur.llm import UnloadableConfigError
from secateur.llm.loadable import UnloadableShapeError, plain_save_problems

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

#: Families whose config has no MLP-width field: the field named instead (the MLP is 4 x it).
MLP_REFUSED = {"bloom": "hidden_size", "mpt": "d_model"}
#: Families whose config reads head_dim (or a fixed head size): uniform head counts reload.
HEADS_LOAD = ("llama", "mistral", "qwen2", "gemma3", "qwen3")
#: Families whose heads the dependency graph leaves whole today (named GraphError: nothing to prune).
HEADS_FROZEN = ("falcon", "bloom", "mpt", "phi3", "olmo2")
#: Fused QKV losing whole KV groups with their query heads; the head size derives from the hidden size.
HEADS_WITH_KV_GROUPS = ("falcon_gqa",)

_ATTENTION = ["*attn*", "*attention*", "*pooler*", "*classifier*"]
_MLP = ["*mlp*", "*intermediate*", "*ffn*", "*feed_forward*", "*pooler*", "*classifier*"]


def _auto(name: str):
    return (
        transformers.AutoModelForCausalLM
        if name in DECODER_LMS
        else transformers.AutoModelForSequenceClassification
    )


def _logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return call_model(model.eval(), x).logits


def _prune(name: str, protect: list[str], sparsity: float = 0.5, **kw):
    torch.manual_seed(0)
    model, x = HF_MODELS[name]()
    pruned, plan = sc.prune_channels(
        model.eval(), x, criterion="l1", sparsity=sparsity, protect=protect, **kw
    )
    return pruned, plan, x


def _assert_plain_reload(name, pruned, plan, x, folder):
    """``require_loadable`` writes; plain transformers' Auto class loads the same class and logits."""
    sc.save_pretrained(pruned, folder, plan, require_loadable=True)
    plain = _auto(name).from_pretrained(folder)
    assert type(plain) is type(pruned)
    assert torch.equal(_logits(plain, x), _logits(pruned, x))


def _assert_refused(pruned, plan, x, folder, match):
    """The named refusal writes nothing; secateur's own folder reloads bit-exactly."""
    want = _logits(pruned, x)
    with pytest.raises(UnloadableConfigError, match=match):
        sc.save_pretrained(pruned, folder / "plain", plan, require_loadable=True)
    assert not (folder / "plain").exists()
    sc.save_pretrained(pruned, folder / "sc", plan)
    assert torch.equal(_logits(sc.from_pretrained(folder / "sc"), x), want)


@pytest.mark.parametrize("name", DECODER_LMS + ENCODERS)
def test_mlp_pruning_reloads_in_plain_transformers_or_names_the_field(tmp_path, name):
    pruned, plan, x = _prune(name, _ATTENTION)
    assert plan["groups"], f"{name}: no MLP group was pruned"
    if name in MLP_REFUSED:
        field = MLP_REFUSED[name]
        _assert_refused(pruned, plan, x, tmp_path, rf"{field} \(\d+\): \S+ builds its MLP as 4 x {field}")
        return
    _assert_plain_reload(name, pruned, plan, x, tmp_path)


@pytest.mark.parametrize("name", DECODER_LMS + ENCODERS)
def test_head_pruning_reloads_where_the_config_reads_head_dim_else_names_the_field(tmp_path, name):
    if name in HEADS_FROZEN:
        with pytest.raises(GraphError, match="nothing to prune"):
            _prune(name, _MLP)
        return
    pruned, plan, x = _prune(name, _MLP)
    if name in HEADS_LOAD:
        heads = plan["config"][""]["num_attention_heads"]
        assert heads[1] == heads[0] // 2
        _assert_plain_reload(name, pruned, plan, x, tmp_path)
        return
    if name in HEADS_WITH_KV_GROUPS:
        _assert_refused(pruned, plan, x, tmp_path, r"num_attention_heads: num_key_value_heads went 2 -> 1")
        return
    _assert_refused(
        pruned, plan, x, tmp_path, r"num_attention_heads \(4 -> 2\): \S+ derives the head size as"
    )


#: Families whose loadable=True request (every group, MLP rounded to 8) is refused, and the field named.
LOADABLE_REFUSED = {
    "bloom": r"hidden_size \(32\): bloom builds its MLP",
    "mpt": r"d_model \(32\): mpt builds its MLP",
    "deberta_v2": r"sets the pruned width of deberta\.encoder\.layer\.0\.attention\.self\.pos_key_proj",
}


@pytest.mark.parametrize("name", DECODER_LMS + ENCODERS)
def test_loadable_true_gives_a_config_that_describes_the_model_or_names_the_field(name):
    """prune_channels(loadable=True) predicts loadability from the plan on the meta device before changing
    anything; the prediction must hold afterwards (transformers_loadable of the compacted model, no
    save_pretrained refusal installed), and a refusal must leave the model untouched."""
    torch.manual_seed(0)
    model, x = HF_MODELS[name]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    protect = ["*pooler*", "*classifier*"]
    if name in LOADABLE_REFUSED:
        with pytest.raises(UnloadableShapeError, match=LOADABLE_REFUSED[name]):
            sc.prune_channels(model.eval(), x, 0.5, criterion="l1", protect=protect, loadable=True)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        return
    pruned, plan = sc.prune_channels(model.eval(), x, 0.5, criterion="l1", protect=protect, loadable=True)
    assert plan["groups"], f"{name}: nothing was pruned"
    assert transformers_loadable(pruned, plan)
    assert not plain_save_problems(pruned)


def test_bert_hidden_size_pruned_with_its_heads_gives_a_consistent_config(tmp_path):
    """prune_normalized=True at 25%: hidden 32 -> 24 and heads 4 -> 3 keep hidden = heads x 8: plain
    transformers loads it. At 30% the hidden size goes to 23 (not 3 x 8): refused naming num_attention_heads
    (the issue's '9 heads, hidden 384' case), and secateur's own folder still reloads."""
    # nothing protected: the pooler (hidden -> hidden) shrinks with the hidden size, as its config requires
    pruned, plan, x = _prune("bert", [], sparsity=0.25, prune_normalized=True)
    cfg = plan["config"][""]
    assert cfg["hidden_size"] == [32, 24] and cfg["num_attention_heads"] == [4, 3]
    assert "head_dim" not in cfg  # BERT derives it: the family writer drops the redundant key
    _assert_plain_reload("bert", pruned, plan, x, tmp_path / "a")
    pruned, plan, x = _prune("bert", [], sparsity=0.3, prune_normalized=True)
    assert plan["config"][""]["hidden_size"] == [32, 23]
    _assert_refused(pruned, plan, x, tmp_path / "b", r"num_attention_heads \(4 -> 3\).*\(23 / 3\)")


@pytest.mark.parametrize("name", sorted(HF_PENDING_RULES))
def test_models_whose_op_has_no_rule_are_refused_by_name(name):
    """While no coupling rule is registered for the op, the trace refuses naming it; once one is, the model
    passes the matrix's checks (oracle, fewer parameters and MACs)."""
    from test_matrix import assert_prunable

    from secateur.graph.rules import RULES

    build, op = HF_PENDING_RULES[name]
    torch.manual_seed(0)
    model, x = build()
    if op in RULES:
        assert_prunable(model, x)
        return
    with pytest.raises(UnsupportedOpError, match=f"no coupling rule for op '{op}'"):
        assert_prunable(copy.deepcopy(model), x)


def test_a_safetensors_file_whose_header_length_reads_like_a_pickle_opcode_is_not_refused(tmp_path):
    """A safetensors file starts with its header length (u64, little-endian): a length of 0x0580 begins with
    the bytes of pickle protocol 5 (MPT's tiny checkpoint hit this). A real pickle is still refused."""
    import pickle

    from secateur.errors import SerializationError
    from secateur.io.folder import refuse_pickle

    header = b'{"__metadata__":{}}'.ljust(0x0580, b" ")
    f = tmp_path / "model.safetensors"
    f.write_bytes(len(header).to_bytes(8, "little") + header)
    assert f.read_bytes()[:2] == b"\x80\x05"
    refuse_pickle(f)
    f.write_bytes(pickle.dumps({"w": 1}, protocol=5))
    with pytest.raises(SerializationError, match="is a pickle"):
        refuse_pickle(f)


@pytest.mark.parametrize("name", sorted(HIDDEN_LEFT_WHOLE))
def test_hidden_size_left_whole_is_named(name):
    """The BART family's hidden size stays with prune_normalized=True, for the reason hf_models records (the
    matrix's 'a norm was narrowed' check excludes these by that name, not silently)."""
    from secateur.graph import DependencyGraph

    torch.manual_seed(0)
    model, x = HF_MODELS[name]()
    hidden = model.config.d_model
    g = DependencyGraph.build(model.eval(), x, prune_normalized=True)
    frozen = [gr for gr in g.groups if gr.n_units == hidden and not gr.n_prunable and "shared" in gr.name]
    assert frozen and any(HIDDEN_LEFT_WHOLE[name] in r for r in frozen[0].reasons)
