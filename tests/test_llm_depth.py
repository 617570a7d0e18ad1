"""Depth pruning (ShortGPT's Block Influence) on tiny random Gemma 3 and Llama decoders built from configs.

What is checked: BI equals ``1 - mean cos`` computed here from the model's own hidden states (float64); a
block made the identity has BI 0 and is removed first; the pruned model computes exactly what the original
computes with the removed blocks skipped; ``save_pretrained`` -> plain ``AutoModelForCausalLM`` reloads it
with the same logits and the same greedy generation (KV cache: ``layer_idx`` renumbered, Gemma 3's sliding /
full ``layer_types`` kept per block); an interruption at any step of the surgery leaves the model identical;
bad input is refused by name before anything changes.
"""

import copy

import pytest
import torch

from secateur.errors import ConfigError
from secateur.llm import block_influence, prune_depth, remove_blocks
from secateur.llm import depth as depth_mod

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

SLIDING, FULL = "sliding_attention", "full_attention"


def tiny_gemma(n_layers: int = 6) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
        max_position_embeddings=64, layer_types=[SLIDING, SLIDING, FULL] * (n_layers // 3),
    )
    return transformers.Gemma3ForCausalLM(cfg).eval()


def tiny_llama(n_layers: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


BUILDERS = {"gemma3": tiny_gemma, "llama": tiny_llama}


def calibration() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding: excluded from the statistics
    second = {"input_ids": torch.randint(3, 64, (1, 10), generator=g)}  # no mask: every token real
    return [{"input_ids": ids, "attention_mask": mask}, second]


def make_identity(model: torch.nn.Module, i: int) -> None:
    """Zero the block's two output projections: attention and MLP add 0 to the residual stream."""
    with torch.no_grad():
        model.model.layers[i].self_attn.o_proj.weight.zero_()
        model.model.layers[i].mlp.down_proj.weight.zero_()


def state(model: torch.nn.Module) -> dict:
    """Everything the surgery may touch, as comparable values."""
    return {
        "layers": model.model.layers,
        "n": len(model.model.layers),
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "config": model.config.to_dict(),
        "idx": [(n, m.layer_idx) for n, m in model.named_modules() if hasattr(m, "layer_idx")],
    }


def assert_same_state(model: torch.nn.Module, before: dict) -> None:
    now = state(model)
    assert now["layers"] is before["layers"] and now["n"] == before["n"]
    assert now["tensors"].keys() == before["tensors"].keys()
    assert all(torch.equal(now["tensors"][k], v) for k, v in before["tensors"].items())
    assert now["config"] == before["config"] and now["idx"] == before["idx"]


@torch.no_grad()
def logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch, use_cache=False).logits


@torch.no_grad()
def skipping(model: torch.nn.Module, removed: list[int], batch: dict) -> torch.Tensor:
    """Logits of ``model`` with blocks ``removed`` replaced by the identity (a hook returns their input)."""
    handles = [
        model.model.layers[i].register_forward_hook(
            lambda _m, args, kwargs, _out: args[0] if args else kwargs["hidden_states"], with_kwargs=True
        )
        for i in removed
    ]
    try:
        return logits(model, batch)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_block_influence_is_one_minus_mean_cosine_of_the_hidden_states(arch):
    model, data = BUILDERS[arch](), calibration()
    bi = block_influence(model, data)
    # Independent: hidden_states[i] enters block i, hidden_states[i + 1] leaves it (the last is normed: skip).
    n = len(model.model.layers)
    sums, count = torch.zeros(n - 1, dtype=torch.float64), 0
    for b in data:
        mask = b.get("attention_mask", torch.ones_like(b["input_ids"])).bool()
        with torch.no_grad():
            hs = model(**b, output_hidden_states=True, use_cache=False).hidden_states
        for i in range(n - 1):
            x, y = hs[i][mask].double(), hs[i + 1][mask].double()
            sums[i] += ((x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))).sum()
        count += int(mask.sum())
    got = torch.tensor(bi[:-1], dtype=torch.float64)
    torch.testing.assert_close(got, 1 - sums / count, rtol=0, atol=1e-12)
    assert all(0.0 <= v <= 2.0 for v in bi)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_identity_block_has_zero_influence_and_goes_first(arch, tmp_path):
    model, data = BUILDERS[arch](), calibration()
    make_identity(model, 2)
    dense = copy.deepcopy(model)
    report = prune_depth(model, data, 1)
    assert report.influence[2] == pytest.approx(0.0, abs=1e-12)
    assert min(report.influence) == report.influence[2]
    assert report.removed == [2] and len(model.model.layers) == len(dense.model.layers) - 1
    batch = data[0]
    # Removing an identity block changes nothing the model computes.
    assert torch.equal(logits(model, batch), logits(dense, batch))


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_removed_blocks_reload_in_plain_transformers_with_the_same_logits(arch, tmp_path):
    model, data = BUILDERS[arch](), calibration()
    dense = copy.deepcopy(model)
    n = len(model.model.layers)
    report = prune_depth(model, data, 2)
    removed = report.removed
    assert len(removed) == 2 and report.kept == [i for i in range(n) if i not in removed]
    # The two lowest-BI blocks, ties by position.
    assert removed == sorted(sorted(range(n), key=lambda i: (report.influence[i], i))[:2])
    assert len(model.model.layers) == n - 2 and model.config.num_hidden_layers == n - 2
    for new, block in enumerate(model.model.layers):
        assert block.self_attn.layer_idx == new
    if arch == "gemma3":
        assert model.config.layer_types == [dense.config.layer_types[i] for i in report.kept]
    assert report.params_before - report.params_after == sum(
        p.numel() for i in removed for p in dense.model.layers[i].parameters()
    )
    batch = data[0]
    out = logits(model, batch)
    assert torch.equal(out, skipping(dense, removed, batch))  # exactly the original minus those blocks

    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model) and reloaded.config.num_hidden_layers == n - 2
    assert getattr(reloaded.config, "layer_types", None) == getattr(model.config, "layer_types", None)
    assert torch.equal(logits(reloaded, batch), out)
    prompt = batch["input_ids"][:1, :6]
    gen = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(reloaded.generate(prompt, max_new_tokens=6, do_sample=False), gen)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_kv_cache_decoding_matches_the_full_forward_after_removal(arch):
    """``layer_idx`` addresses the cache: once renumbered, cached decoding equals a full forward (float64)."""
    model = BUILDERS[arch]().double()
    remove_blocks(model, [0, 2])
    ids = calibration()[0]["input_ids"][:1]
    with torch.no_grad():
        full = model(ids, use_cache=False).logits[:, -1]
        first = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], cache=first.cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-10, atol=1e-10)


class _Interrupting(depth_mod.Journal):
    """A journal whose ``k``-th change raises (KeyboardInterrupt or an error) after it is made."""

    calls = 0
    at = 1
    exc: type[BaseException] = KeyboardInterrupt

    def set_attr(self, obj, name, value):
        super().set_attr(obj, name, value)
        type(self).calls += 1
        if type(self).calls == type(self).at:
            raise type(self).exc("injected")


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interruption_at_any_step_leaves_the_model_identical(monkeypatch, exc):
    model, data = tiny_gemma(), calibration()
    before = state(model)
    ref = logits(model, data[0])
    monkeypatch.setattr(depth_mod, "Journal", _Interrupting)
    _Interrupting.exc = exc
    # Count the steps of a full removal on a copy, then interrupt after each of them in turn.
    _Interrupting.calls, _Interrupting.at = 0, -1
    remove_blocks(copy.deepcopy(model), [0, 3])
    total = _Interrupting.calls
    assert total >= 4  # the ModuleList, layer indices, num_hidden_layers, layer_types
    for at in range(1, total + 1):
        _Interrupting.calls, _Interrupting.at = 0, at
        with pytest.raises(exc, match="injected"):
            remove_blocks(model, [0, 3])
        assert_same_state(model, before)
    assert torch.equal(logits(model, data[0]), ref)


def test_fraction_of_blocks_and_refusals():
    model, data = tiny_gemma(), calibration()
    before = state(model)
    cases = [
        (dict(n_blocks=6), "would remove every block"),
        (dict(n_blocks=-1), "n_blocks must be an int >= 0"),
        (dict(n_blocks=True), "n_blocks must be an int"),
        (dict(n_blocks=1.5), "n_blocks must be an int"),
        (dict(), "exactly one of n_blocks"),
        (dict(n_blocks=1, sparsity=0.2), "exactly one of n_blocks"),
        (dict(sparsity=1.0), "sparsity"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            prune_depth(model, data, **kwargs)
        assert_same_state(model, before)
    bad = [([6], "out of range"), ([1, 1], "repeat"), (list(range(6)), "one must stay"), (["0"], "ints")]
    for idx, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            remove_blocks(model, idx)
        assert_same_state(model, before)
    with pytest.raises(ConfigError, match="model.layer"):
        prune_depth(model, data, 1, blocks="model.layer")
    # A per-layer config list of unknown meaning is named, not silently left inconsistent.
    model.config.attention_layer_scales = [1.0] * 6
    before = state(model)
    with pytest.raises(ConfigError, match="config.attention_layer_scales"):
        prune_depth(model, data, 1)
    assert_same_state(model, before)
    del model.config.attention_layer_scales
    # sparsity: floor(0.5 * 6) = 3 blocks; removing none is a no-op.
    assert prune_depth(copy.deepcopy(model), data, sparsity=0.5).removed.__len__() == 3
    assert prune_depth(model, data, 0).removed == [] and len(model.model.layers) == 6
