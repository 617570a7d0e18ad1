"""One-shot pruning of a checkpoint streamed from disk block by block (secateur.llm.prune_checkpoint).

Tiny GPT-2 and Llama models are saved with ``save_pretrained`` (one file and sharded), pruned from
disk with magnitude, Wanda and SparseGPT on byte-encoded Debian fortunes, and the output, reloaded
with plain ``transformers``, is compared with ``prune_oneshot`` run on the whole model in memory.
"""

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch

import secateur.llm.offload as offload
import secateur.llm.oneshot as oneshot
from secateur.errors import ConfigError
from secateur.llm import load_fortunes, prune_checkpoint, prune_oneshot

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEQ = 48


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batches():
    """3 batches of 4 fortunes as UTF-8 byte ids (vocab 256), right-padded to 48 with a mask."""
    texts = load_fortunes(max_items=60, seed=1).calibration[:12]
    out = []
    for i in range(0, 12, 4):
        ids = torch.zeros(4, SEQ, dtype=torch.long)
        mask = torch.zeros(4, SEQ, dtype=torch.long)
        for r, t in enumerate(texts[i : i + 4]):
            b = list(t.encode("utf-8"))[:SEQ]
            ids[r, : len(b)] = torch.tensor(b)
            mask[r, : len(b)] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    assert any(int(b["attention_mask"].sum()) < b["attention_mask"].numel() for b in out)  # some padding
    return out


def _gpt2():
    cfg = transformers.GPT2Config(
        n_layer=3, n_embd=32, n_head=4, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg), "transformer.h."


def _llama():
    cfg = transformers.LlamaConfig(
        num_hidden_layers=3,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg), "model.layers."


def _save(tmp_path: Path, kind: str, sharded: bool) -> tuple[Path, str]:
    torch.manual_seed(0)
    model, prefix = _gpt2() if kind == "gpt2" else _llama()
    path = tmp_path / f"{kind}-in"
    model.save_pretrained(path, max_shard_size="20KB" if sharded else "1GB")
    assert (path / "model.safetensors.index.json").exists() == sharded
    return path, prefix


def _hashes(root: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(root.iterdir())}


def _out_in(name: str, w: torch.Tensor) -> torch.Tensor:
    """Weights as (out, in): GPT-2's Conv1D stores (in, out)."""
    return w.T if ".attn.c_" in name or ".mlp.c_" in name else w


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.numel() * t.element_size()
    return total


CASES = [("gpt2", False), ("llama", True)]
# What runs before the first block. GPT-2's head is tied to wte; Llama's head and every final norm
# run after the last block and are never read.
EMBEDDINGS = {
    "gpt2": {"transformer.wte.weight", "transformer.wpe.weight"},
    "llama": {"model.embed_tokens.weight"},
}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["row", "2:4"])
@pytest.mark.parametrize(("kind", "sharded"), CASES)
def test_streamed_equals_in_memory_and_meets_constraints(tmp_path, batches, kind, sharded, method, pattern):
    src, prefix = _save(tmp_path, kind, sharded)
    before = _hashes(src)
    out = tmp_path / "out"
    rep = prune_checkpoint(src, out, batches, method, 0.5, pattern)
    assert _hashes(src) == before  # the input is only read

    # Same files (shards, index, config) as the input; plain transformers loads the result.
    assert sorted(f.name for f in out.iterdir()) == sorted(before)
    assert rep.copied_files == sorted(before) and rep.skipped_files == []
    pruned = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    dense = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    prune_oneshot(ref, batches, method, 0.5, pattern, as_masks=False)
    got, want, orig = pruned.state_dict(), ref.state_dict(), dense.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k

    names = sorted(k for k in want if k.startswith(prefix) and k.endswith(".weight") and want[k].dim() == 2)
    assert sorted(rep.written_tensors) == names and len(names) == 3 * (4 if kind == "gpt2" else 7)
    for k in want:  # everything else is the dense tensor
        if k not in names:
            assert torch.equal(got[k], orig[k]), k
    for k in names:
        w = _out_in(k, got[k])
        w0 = _out_in(k, orig[k])
        out_f, in_f = w.shape
        zeros = w == 0
        if pattern == "2:4":
            assert (zeros.view(out_f, in_f // 4, 4).sum(-1) == 2).all(), k
        elif method == "sparsegpt":  # adaptive selection: exact count per layer
            assert int(zeros.sum()) == math.floor(0.5 * out_f * in_f), k
        else:  # per output row
            assert (zeros.sum(1) == in_f // 2).all(), k
        if method == "magnitude" and pattern == "row":  # the lowest |w| of each row, from the dense weights
            low = torch.argsort(w0.abs(), dim=1, stable=True)[:, : in_f // 2]
            expect = torch.zeros_like(zeros).scatter_(1, low, True)
            assert torch.equal(zeros, expect), k
        if method != "sparsegpt":  # survivors keep their values
            assert torch.equal(w[~zeros], w0[~zeros]), k
    with torch.no_grad():
        assert torch.isfinite(pruned(**batches[0]).logits).all()

    # Memory: the most checkpoint bytes held at once is the larger of the embeddings (all the
    # calibration pass before block 0 needs) and one block, computed here from the dense model.
    sd = dense.state_dict()
    embed = _unique_bytes(v for k, v in sd.items() if k in EMBEDDINGS[kind])
    per_block = [_unique_bytes(v for k, v in sd.items() if k.startswith(f"{prefix}{i}.")) for i in range(3)]
    assert rep.non_block_bytes == embed and rep.block_bytes == per_block
    assert rep.peak_materialised_bytes == max(embed, max(per_block))
    assert rep.peak_materialised_bytes < _unique_bytes(sd.values())


def test_only_one_block_or_the_outside_is_materialised_at_a_time(tmp_path, batches, monkeypatch):
    """Checked from outside: at the calibration pass every block is on meta; during a block's turn, the
    parameters not on meta are exactly that block's."""
    src, prefix = _save(tmp_path, "llama", True)
    seen: dict = {}
    real_cal, real_block = offload.calibration_stack_inputs, offload.prune_block

    def cal(model, block_list, *args, **kwargs):
        seen["model"] = model
        live = [n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type != "meta"]
        seen["calibration"] = live
        out = real_cal(model, block_list, *args, **kwargs)
        after = [n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type != "meta"]
        seen["after_calibration"] = after
        return out

    def block(blk, linears, *args, **kwargs):
        live = {n for n, p in seen["model"].named_parameters() if p.device.type != "meta"}
        i = linears[0][0][len(prefix) :].split(".")[0]
        seen.setdefault("blocks", []).append(i)
        assert live == {f"{prefix}{i}.{n}" for n, _ in blk.named_parameters()}
        return real_block(blk, linears, *args, **kwargs)

    monkeypatch.setattr(offload, "calibration_stack_inputs", cal)
    monkeypatch.setattr(offload, "prune_block", block)
    prune_checkpoint(src, tmp_path / "out", batches, "wanda", 0.5, "row")
    assert seen["blocks"] == ["0", "1", "2"]
    assert seen["calibration"] == []  # the embedding is read when it is first called
    assert seen["after_calibration"] == ["model.embed_tokens.weight"]
    assert all(p.device.type == "meta" for p in seen["model"].parameters())  # freed at the end


def test_failure_midway_leaves_no_output_and_input_untouched(tmp_path, batches, monkeypatch):
    src, _ = _save(tmp_path, "gpt2", True)
    before = _hashes(src)
    listing = sorted(os.listdir(tmp_path))
    real = oneshot.prune_linear
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # block 1, after block 0's weights were written
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(oneshot, "prune_linear", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        prune_checkpoint(src, tmp_path / "out", batches, "sparsegpt", 0.5, "row")
    assert calls["n"] == 6
    assert sorted(os.listdir(tmp_path)) == listing  # no output, no temporary directory left
    assert _hashes(src) == before


def test_bad_input_is_refused_before_anything_is_written(tmp_path, batches):
    src, _ = _save(tmp_path, "gpt2", False)
    before = _hashes(src)
    listing = sorted(os.listdir(tmp_path))
    with pytest.raises(ConfigError, match=r"transformer\.h\.0\.attn\.c_attn.*not divisible by M=5"):
        prune_checkpoint(src, tmp_path / "out", batches, "wanda", pattern="3:5")
    with pytest.raises(ConfigError, match="unknown one-shot method"):
        prune_checkpoint(src, tmp_path / "out", batches, "obs")
    with pytest.raises(ConfigError, match="no calibration batches"):
        prune_checkpoint(src, tmp_path / "out", [], "wanda")
    with pytest.raises(ConfigError, match="outside the checkpoint"):
        prune_checkpoint(src, src / "pruned", batches, "wanda")
    with pytest.raises(ConfigError, match="no config.json"):
        prune_checkpoint(tmp_path, tmp_path / "out", batches, "wanda")
    assert sorted(os.listdir(tmp_path)) == listing and _hashes(src) == before
    # An existing output directory is refused and left as it was.
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        prune_checkpoint(src, tmp_path / "taken", batches, "wanda")
    assert os.listdir(tmp_path / "taken") == ["keep.txt"]


def test_checkpoint_missing_a_tensor_or_with_wrong_shape_names_it(tmp_path, batches):
    from safetensors.torch import load_file, save_file

    src, _ = _save(tmp_path, "gpt2", False)
    tensors = load_file(src / "model.safetensors")
    cfg = (src / "config.json").read_text()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(cfg)
    missing = {k: v for k, v in tensors.items() if k != "transformer.h.1.mlp.c_fc.weight"}
    save_file(missing, bad / "model.safetensors")
    with pytest.raises(ConfigError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight .*missing"):
        prune_checkpoint(bad, tmp_path / "out", batches, "wanda")
    wrong = dict(tensors)
    wrong["transformer.wpe.weight"] = torch.zeros(10, 32)
    save_file(wrong, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"safetensors: transformer\.wpe\.weight has shape \(10, 32\)"):
        prune_checkpoint(bad, tmp_path / "out", batches, "wanda")
    (bad / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no model.safetensors"):
        prune_checkpoint(bad, tmp_path / "out", batches, "wanda")
    assert not (tmp_path / "out").exists()


def test_include_prunes_only_selected_layers_and_other_formats_are_left_out(tmp_path, batches):
    src, _ = _save(tmp_path, "gpt2", True)
    (src / "pytorch_model.bin").write_bytes(b"dense weights in another format")
    (src / "tokenizer.json").write_text("{}")
    out = tmp_path / "out"
    rep = prune_checkpoint(src, out, batches, "sparsegpt", 0.5, "row", include=r"h\.1\.mlp\.")
    assert rep.skipped_files == ["pytorch_model.bin"] and "tokenizer.json" in rep.copied_files
    assert not (out / "pytorch_model.bin").exists()
    assert rep.written_tensors == ["transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index == json.loads((src / "model.safetensors.index.json").read_text())
    got = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    ref = transformers.AutoModelForCausalLM.from_pretrained(src)
    prune_oneshot(ref, batches, "sparsegpt", 0.5, "row", include=r"h\.1\.mlp\.", as_masks=False)
    for k, v in ref.state_dict().items():
        assert torch.equal(got[k], v), k
    # Blocks after the last selected one are never loaded.
    assert rep.peak_materialised_bytes == max(rep.non_block_bytes, *rep.block_bytes[:2])


def test_model_reading_weights_without_calling_modules_falls_back_to_all_outside_tensors(
    tmp_path, batches, monkeypatch
):
    """If the lazy pass fails (as when a model's code reads a weight that is still on meta), every
    tensor outside the blocks is loaded and the pass runs again: same result, more bytes held."""
    src, prefix = _save(tmp_path, "gpt2", False)
    real = offload.calibration_stack_inputs
    calls = {"n": 0}

    def first_fails(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] == 1:
            raise RuntimeError("Tensor on device meta is not on the expected device cpu")
        return out

    monkeypatch.setattr(offload, "calibration_stack_inputs", first_fails)
    rep = prune_checkpoint(src, tmp_path / "out", batches, "wanda", 0.5, "2:4")
    assert calls["n"] == 2
    dense = transformers.AutoModelForCausalLM.from_pretrained(src)
    outside = _unique_bytes(v for k, v in dense.state_dict().items() if not k.startswith(prefix))
    assert rep.non_block_bytes == outside > _unique_bytes(
        v for k, v in dense.state_dict().items() if k in EMBEDDINGS["gpt2"]
    )
    prune_oneshot(dense, batches, "wanda", 0.5, "2:4", as_masks=False)
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    for k, v in dense.state_dict().items():
        assert torch.equal(got[k], v), k


def _gemma3():
    """Tiny Gemma 3: blocks 0-1 sliding-window attention (window 4), block 2 full attention; the two kinds
    get different attention masks and rotary embeddings (local base 10k, global 1M) from the model."""
    cfg = transformers.Gemma3TextConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=4, max_position_embeddings=64,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], initializer_range=0.1,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return transformers.Gemma3ForCausalLM(cfg)


@pytest.mark.parametrize(("method", "pattern"), [("wanda", "row"), ("sparsegpt", "2:4")])
def test_gemma3_blocks_are_calibrated_with_their_own_masks_and_rotary(tmp_path, batches, method, pattern,
                                                                      monkeypatch):
    """Sliding-window and full-attention blocks of Gemma 3 are each calibrated with the arguments the model
    hands them: the streamed masks and weights equal prune_oneshot's (which records every block's call);
    giving every block the first block's arguments (the former behaviour) changes the full-attention
    block's result, so this test would catch it."""
    torch.manual_seed(0)
    src = tmp_path / "gemma-in"
    _gemma3().save_pretrained(src, max_shard_size="40KB")
    rep = prune_checkpoint(src, tmp_path / "out", batches, method, 0.5, pattern)
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    ref = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    prune_oneshot(ref, batches, method, 0.5, pattern, as_masks=False)
    want = ref.state_dict()
    assert len(rep.written_tensors) == 3 * 7
    for k in want:
        assert torch.equal(got[k] == 0, want[k] == 0), k  # the same masks
        assert torch.equal(got[k], want[k]), k  # and the same (SparseGPT-updated) weights

    real = offload.calibration_stack_inputs

    def first_args_for_all(*args, **kwargs):
        inputs, masks, n_tokens, block_args = real(*args, **kwargs)
        assert block_args is not None  # Gemma 3's blocks are not called alike
        return inputs, masks, n_tokens, None

    monkeypatch.setattr(offload, "calibration_stack_inputs", first_args_for_all)
    prune_checkpoint(src, tmp_path / "old", batches, method, 0.5, pattern)
    old = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "old").state_dict()
    full = [k for k in rep.written_tensors if k.startswith("model.layers.2.")]
    sliding = [k for k in rep.written_tensors if k.startswith("model.layers.0.")]
    assert all(torch.equal(old[k], want[k]) for k in sliding)  # block 0 got its own arguments anyway
    assert any(not torch.equal(old[k] == 0, want[k] == 0) for k in full)
