"""Fault injection: surgery either fully succeeds or leaves the model exactly as it was, under any exception.

For a residual CNN (zoo ResNet-8), a tiny random BERT (heads, FFN and hidden size, with mask-aware norm hooks
installed) and a tiny random Llama (grouped-query heads and MLP, config written), every step of
:func:`secateur.compact.compact` is counted: each slicing call, each tensor ``.data`` write, each module
attribute write, each config write, each norm-hook removal, and the check at the end. Then, for every step
``k``, an ordinary exception *and* a ``KeyboardInterrupt`` are raised at step ``k`` (after the write, the
hardest moment): the state_dict (``torch.equal``, dtypes, shapes, storages), every plain module attribute,
the forward hooks and the config must be identical to before, the ordinary exception must come out as a
CompactionError chained to it, and the interrupt as itself. After all the injections the model still
compacts, and equals its masked reference.

Then one interrupt test each for the transactions built on compaction or beside it: ChannelPruner.finalize,
prune_heads, llm.prune_decoder, llm.remove_experts, prune_oneshot, prune_checkpoint, FBS and FisherPruner.
"""

from __future__ import annotations

import copy
import hashlib
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import secateur.compact.apply as apply_mod
import secateur.compact.transaction as transaction_mod
from secateur.allocation.structured import choose_units
from secateur.compact import Journal, check_equivalence, compact, hf_configs, make_plan, mask_model, restoring
from secateur.errors import CompactionError
from secateur.graph import DependencyGraph

sys.path.insert(0, str(Path(__file__).parent / "graph"))
import hf_models  # noqa: E402

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------------
# the state that must survive
# ------------------------------------------------------------------------------------------------------
_PLAIN = (int, float, bool, str, tuple, type(None), torch.Size)


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a rollback must restore: tensors (values, dtype, shape, storage, Parameter identity,
    requires_grad), every plain attribute of every module, the forward hooks and the configs."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    meta = {k: (v.dtype, tuple(v.shape), v.data_ptr()) for k, v in model.state_dict().items()}
    params = {n: (id(p), p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)}
    attrs = {
        path: {k: v for k, v in vars(m).items() if not k.startswith("_") and isinstance(v, _PLAIN)}
        for path, m in model.named_modules()
    }
    hooks = {path: [(k, id(h)) for k, h in m._forward_hooks.items()] for path, m in model.named_modules()}
    configs = {k: (c.to_dict(), sorted(vars(c))) for k, c in hf_configs(model).items()}
    return {
        "state": state,
        "meta": meta,
        "params": params,
        "attrs": attrs,
        "hooks": hooks,
        "configs": configs,
    }


def assert_same(model: nn.Module, before: dict[str, Any], where: str = "") -> None:
    now = snapshot(model)
    assert now["state"].keys() == before["state"].keys(), where
    for k, v in before["state"].items():
        assert torch.equal(now["state"][k], v), f"{where}: {k} changed"
    assert now["meta"] == before["meta"], where
    assert now["params"] == before["params"], where
    assert now["attrs"] == before["attrs"], where
    assert now["hooks"] == before["hooks"], where
    assert now["configs"] == before["configs"], where


# ------------------------------------------------------------------------------------------------------
# step counting and injection
# ------------------------------------------------------------------------------------------------------
class Faults:
    """Counts compaction steps; raises ``exc`` at step ``at`` (after the step's write)."""

    def __init__(self) -> None:
        self.kinds: list[str] = []
        self.at: int | None = None
        self.exc: BaseException | None = None
        self.fired = False

    def arm(self, at: int | None, exc: BaseException | None = None) -> None:
        self.kinds, self.at, self.exc, self.fired = [], at, exc, False

    def step(self, kind: str) -> None:
        self.kinds.append(kind)
        if self.at is not None and len(self.kinds) - 1 == self.at:
            self.fired = True
            raise self.exc

    def check(self, _model: nn.Module) -> None:
        self.step("check")


@pytest.fixture
def faults(monkeypatch) -> Faults:
    """Every low-level change compaction makes goes through one of these: slicing (``_sliced``) and the
    journal's writes (``set_data``, ``set_attr``, ``record``)."""
    f = Faults()
    sliced, set_data, set_attr, record = (
        apply_mod._sliced,
        Journal.set_data,
        Journal.set_attr,
        Journal.record,
    )

    def _sliced(t, dims, *scratch):
        f.step("slice")
        return sliced(t, dims, *scratch)

    def _set_data(self, t, new):
        set_data(self, t, new)
        f.step("data")

    def _set_attr(self, obj, name, value):
        set_attr(self, obj, name, value)
        f.step("config" if isinstance(obj, transformers.PretrainedConfig) else "attr")

    def _record(self, restore):
        record(self, restore)
        f.step("hook")

    monkeypatch.setattr(apply_mod, "_sliced", _sliced)
    monkeypatch.setattr(Journal, "set_data", _set_data)
    monkeypatch.setattr(Journal, "set_attr", _set_attr)
    monkeypatch.setattr(Journal, "record", _record)
    return f


# ------------------------------------------------------------------------------------------------------
# the three models, each with a plan
# ------------------------------------------------------------------------------------------------------
def _plan(model: nn.Module, x: Any, ratio: float = 0.5, **build) -> dict:
    graph = DependencyGraph.build(model, x, **build)
    rng = np.random.default_rng(0)
    removed = {}
    for gi, g in enumerate(graph.groups):
        if g.n_prunable:
            rm = choose_units(g, rng.random(g.n_units), ratio)
            if rm.size:
                removed[gi] = rm
    return make_plan(graph, removed)


def _resnet() -> tuple[nn.Module, Any, dict]:
    from secateur.zoo import create_model

    torch.manual_seed(0)
    model = create_model("resnet8", width=0.5).eval()
    x = torch.randn(2, 1, 16, 16)
    return model, x, _plan(model, x)


def _bert() -> tuple[nn.Module, Any, dict]:
    torch.manual_seed(0)
    model, x = hf_models.bert()
    model.eval()
    plan = _plan(model, x, prune_normalized=True)  # heads, FFN and the hidden size (norms)
    assert plan.get("norms") and plan["config"][""]
    mask_model(model, plan)  # mask-aware norm hooks in place: compaction removes them (journaled)
    return model, x, plan


def _llama() -> tuple[nn.Module, Any, dict]:
    torch.manual_seed(0)
    model, x = hf_models.llama()
    model.eval()
    with torch.no_grad():  # HF init is tiny: outputs then sit near zero
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    plan = _plan(model, x)
    assert {"num_attention_heads", "num_key_value_heads", "intermediate_size"} <= set(plan["config"][""])
    return model, x, plan


MODELS: dict[str, Callable[[], tuple[nn.Module, Any, dict]]] = {
    "resnet8": _resnet,
    "bert": _bert,
    "llama": _llama,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_step_of_compaction_rolls_back_bit_identical(name, faults):
    model, x, plan = MODELS[name]()
    reference = mask_model(copy.deepcopy(model), plan)

    faults.arm(None)  # count the steps on a copy
    compact(copy.deepcopy(model), plan, check=faults.check)
    kinds = list(faults.kinds)
    n = len(kinds)
    counts = {k: kinds.count(k) for k in sorted(set(kinds))}
    assert counts["slice"] == counts["data"] > 0 and counts["attr"] > 0 and kinds[-1] == "check"
    if name != "resnet8":
        assert counts["config"] > 0
    if name == "bert":
        assert counts["hook"] > 0

    before = snapshot(model)
    for k in range(n):
        for exc in (RuntimeError(f"injected at {k}"), KeyboardInterrupt()):
            faults.arm(k, exc)
            if isinstance(exc, KeyboardInterrupt):
                with pytest.raises(KeyboardInterrupt) as ei:
                    compact(model, plan, check=faults.check)
                assert ei.value is exc  # re-raised unchanged, not wrapped
            else:
                with pytest.raises(CompactionError, match="rolled back") as ei:
                    compact(model, plan, check=faults.check)
                assert ei.value.__cause__ is exc
            assert faults.fired and faults.kinds[-1] == kinds[k]
            assert_same(model, before, f"{name}: {type(exc).__name__} at step {k} ({kinds[k]})")

    faults.arm(None)  # the model is intact: it still compacts, exactly
    compact(model, plan)
    assert len(faults.kinds) == n - 1  # every step but the check
    check_equivalence(reference, model, x)
    print(f"{name}: {n} steps {counts}, each with an exception and a KeyboardInterrupt")


@pytest.mark.parametrize("exc_type", [SystemExit, GeneratorExit, KeyboardInterrupt])
def test_other_base_exceptions_roll_back_and_propagate_unchanged(exc_type, faults):
    model, x, plan = _resnet()
    faults.arm(None)
    compact(copy.deepcopy(model), plan, check=faults.check)
    middle = len(faults.kinds) // 2
    before = snapshot(model)
    faults.arm(middle, exc_type())
    with pytest.raises(exc_type):
        compact(model, plan, check=faults.check)
    assert faults.fired
    assert_same(model, before)


def test_malformed_plans_are_refused_with_compaction_error_and_nothing_changes():
    model, x, plan = _resnet()
    before = snapshot(model)
    first = next(iter(plan["tensors"]))
    bad_plans = [
        [],  # not a mapping
        {"tensors": []},
        {"tensors": {"nope.weight": {"0": [0]}}},
        {"tensors": {**plan["tensors"], first: {"0": [10**6]}}},  # index out of range, after other slices
        {"tensors": {**plan["tensors"], first: 3}},
        {"tensors": plan["tensors"], "attributes": {"layer1": 3}},  # not {attr: [old, new]}
        {"tensors": plan["tensors"], "config": {"": {"hidden_size": 8}}},
        {"tensors": plan["tensors"], "attributes": {"no.such.module": {"num_heads": [2, 1]}}},
    ]
    for bad in bad_plans:
        with pytest.raises(CompactionError):
            compact(model, bad)
        assert_same(model, before, repr(bad)[:60])
    for bad in bad_plans[:2]:  # the masks refuse a plan of the wrong shape the same way
        with pytest.raises(CompactionError, match="a plan is a mapping"):
            mask_model(model, bad)
    assert_same(model, before)


@pytest.fixture
def ctrl_c_raises() -> Any:
    """SIGINT handled by Python's ``signal.default_int_handler`` (KeyboardInterrupt) for the test's duration,
    the previous handler put back after: a test run in the background (``pytest ... &`` from a
    non-interactive shell) starts with SIGINT ignored (SIG_IGN), and an ignored Ctrl-C raises nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("ctrl_c_raises")
def test_a_second_ctrl_c_during_the_rollback_is_held_until_the_rollback_ends(faults, monkeypatch):
    """The restore runs to completion even if SIGINT arrives in the middle of it; the interrupt is then
    delivered as a KeyboardInterrupt."""
    model, x, plan = _resnet()
    before = snapshot(model)
    real = transaction_mod._restore_attr
    calls = {"n": 0}

    def restore_attr(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C pressed again while restoring
        real(*args)

    monkeypatch.setattr(transaction_mod, "_restore_attr", restore_attr)
    faults.arm(None)
    compact(copy.deepcopy(model), plan, check=faults.check)
    n = len(faults.kinds)
    faults.arm(n - 1, RuntimeError("oracle failed"))  # at the check: every change is made, then undone
    with pytest.raises(KeyboardInterrupt):
        compact(model, plan, check=faults.check)
    assert calls["n"] > 2  # the rollback went on after the signal
    assert_same(model, before)

    done = []

    def restore():
        signal.raise_signal(signal.SIGINT)
        done.append("restored")

    with pytest.raises(KeyboardInterrupt) as ei:
        with restoring(restore):
            raise ValueError("first failure")
    assert done == ["restored"] and isinstance(ei.value.__context__, ValueError)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_ctrl_c_stays_ignored_during_a_rollback():
    """Under SIG_IGN (a background job) a SIGINT during the restore is ignored, as it would be anywhere:
    the restore completes, the original failure comes out, SIG_IGN is still in force."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        done = []

        def restore():
            signal.raise_signal(signal.SIGINT)
            done.append("restored")

        with pytest.raises(ValueError, match="first failure"):
            with restoring(restore):
                raise ValueError("first failure")
        assert done == ["restored"]
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_under_the_os_default_is_redelivered_after_the_deferred_block():
    """Under SIG_DFL (no Python handler: the OS default terminates the process) a SIGINT held during the
    block is not dropped: the block completes, then the process ends by SIGINT (before this fix it ran on)."""
    import subprocess

    script = (
        "import signal\n"
        "signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
        "from secateur.compact.transaction import interrupts_deferred\n"
        "with interrupts_deferred():\n"
        "    signal.raise_signal(signal.SIGINT)\n"
        "    print('block finished', flush=True)\n"
        "print('ran on after the signal', flush=True)\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.stdout == "block finished\n", (res.stdout, res.stderr)
    assert res.returncode == -signal.SIGINT, (res.returncode, res.stderr)


# ------------------------------------------------------------------------------------------------------
# transactions built on compaction, or beside it
# ------------------------------------------------------------------------------------------------------
def _raise_on_call(monkeypatch, owner: Any, attr: str, n: int, exc: BaseException) -> dict:
    """Replace ``owner.attr`` (a module function or a method) by one raising ``exc`` on its ``n``-th call."""
    real = getattr(owner, attr)
    calls = {"n": 0}

    def wrapper(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return real(*a, **k)

    monkeypatch.setattr(owner, attr, wrapper)
    return calls


def _target(dotted: str) -> tuple[Any, str]:
    """``"module.attr"`` or ``"module.Class.attr"`` (modules by short name) as ``(owner, attr)``."""
    import secateur.compact.verify as verify
    import secateur.llm.moe as moe
    import secateur.llm.offload as offload
    import secateur.llm.oneshot as oneshot
    import secateur.llm.structural as structural
    import secateur.methods.fbs as fbs
    import secateur.pruners.channel as structured_pruner

    owners = {
        "verify": verify,
        "moe": moe,
        "offload": offload,
        "oneshot": oneshot,
        "structural": structural,
        "fbs": fbs,
        "structured_pruner": structured_pruner,
        "Journal": Journal,
    }
    *path, attr = dotted.split(".")
    owner = owners[path[0]]
    for p in path[1:]:
        owner = getattr(owner, p)
    return owner, attr


def _no_masks(model: nn.Module) -> bool:
    from torch.nn.utils import parametrize

    return not any(parametrize.is_parametrized(m) for m in model.modules())


@pytest.mark.parametrize("where", ["compaction", "oracle"])
def test_channel_pruner_compact_interrupted_keeps_masks_and_drifted_weights(where, monkeypatch):
    from secateur import ChannelPruner
    from secateur.masks import get_mask, masked_parameters

    torch.manual_seed(0)
    from secateur.zoo import create_model

    model = create_model("resnet8", width=0.5).eval()
    x = torch.randn(2, 1, 16, 16)
    pruner = ChannelPruner(model, x, schedule=0.5, criterion="l1")
    pruner.step(0)
    with torch.no_grad():  # stored values under a mask drift under momentum: they must survive too
        for _, mod, pname in masked_parameters(model):
            orig = mod.parametrizations[pname].original
            orig.add_((~get_mask(mod, pname)).to(orig.dtype) * 0.5)
    before = snapshot(model)
    import secateur.compact.verify as verify

    owner, attr, n = (Journal, "set_data", 7) if where == "compaction" else (verify, "check_equivalence", 1)
    calls = _raise_on_call(monkeypatch, owner, attr, n, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        pruner.finalize()
    assert calls["n"] >= 1
    assert_same(model, before)  # masks attached again, drifted values and storages back
    monkeypatch.undo()
    pruner.finalize()  # and it compacts afterwards
    assert _no_masks(model)


def test_channel_pruner_interrupt_right_after_the_commit_leaves_a_consistent_compacted_model(monkeypatch):
    """An interrupt landing after compaction completed but before ChannelPruner.finalize returns: the
    model stays compacted (weights, attributes, config agree) rather than half-restored."""
    import secateur.pruners.channel as sp
    from secateur import ChannelPruner
    from secateur.masks.element import copy_model
    from secateur.zoo import create_model

    torch.manual_seed(0)
    model = create_model("resnet8", width=0.5).eval()
    x = torch.randn(2, 1, 16, 16)
    pruner = ChannelPruner(model, x, schedule=0.5, criterion="l1")
    pruner.step(0)
    reference = copy_model(model)  # masked: what the compacted model must compute
    n_params = sum(p.numel() for p in model.parameters())
    real = sp.verified_compact

    def then_interrupt(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(sp, "verified_compact", then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        pruner.finalize()
    assert _no_masks(model) and sum(p.numel() for p in model.parameters()) < n_params / 2
    check_equivalence(reference, model, x)  # consistent: runs, and computes what the masked model does


@pytest.mark.parametrize(
    "target,n",
    [
        ("structured_pruner.ChannelPruner.scores", 1),  # while scoring (selection does not mask)
        ("Journal.set_data", 5),  # while compacting
        ("verify.check_equivalence", 1),  # in the oracle
    ],
)
def test_prune_heads_interrupted_leaves_model_as_before(target, n, monkeypatch):
    from secateur import prune_heads

    torch.manual_seed(0)
    model, x = hf_models.bert()
    model.eval()
    before = snapshot(model)
    calls = _raise_on_call(monkeypatch, *_target(target), n, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        prune_heads(model, x, 0.5, criterion="l1")
    assert calls["n"] == n
    assert_same(model, before)
    assert _no_masks(model)


def _decoder_calib() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 99, (3, 10), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize(
    "target,n",
    [
        ("structural.causal_lm_loss", 1),  # while scoring (Taylor)
        ("Journal.set_attr", 3),  # while compacting
        ("verify.check_equivalence", 1),  # in the oracle
    ],
)
def test_prune_decoder_interrupted_leaves_model_as_before(target, n, monkeypatch):
    from secateur.llm import prune_decoder

    torch.manual_seed(0)
    model = hf_models.llama(num_hidden_layers=3)[0].eval()
    before = snapshot(model)
    grads = [p.grad for p in model.parameters()]
    calls = _raise_on_call(monkeypatch, *_target(target), n, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        prune_decoder(model, _decoder_calib(), sparsity=0.5, layers=[1], criterion="llm_pruner")
    assert calls["n"] == n
    assert_same(model, before)
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))


def _mixtral() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=16,
        num_local_experts=6,
        num_experts_per_tok=2,
        max_position_embeddings=32,
    )
    return transformers.MixtralForCausalLM(cfg).eval()


@pytest.mark.parametrize("target,n", [("Journal.set_data", 4), ("moe.check_equivalence", 1)])
def test_remove_experts_interrupted_leaves_model_as_before(target, n, monkeypatch):
    from secateur.llm import remove_experts

    model = _mixtral()
    before = snapshot(model)
    router_class = type(model.model.layers[0].mlp.gate)
    calls = _raise_on_call(monkeypatch, *_target(target), n, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        remove_experts(model, _decoder_calib(), sparsity=0.5)
    assert calls["n"] == n
    assert_same(model, before)
    assert type(model.model.layers[0].mlp.gate) is router_class


def test_prune_oneshot_interrupted_leaves_model_as_before(monkeypatch):
    from secateur.llm import prune_oneshot

    torch.manual_seed(0)
    model = hf_models.llama()[0].eval()
    before = snapshot(model)
    calls = _raise_on_call(monkeypatch, *_target("oneshot.prune_linear"), 9, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):  # in the second block, after the first was pruned and masked
        prune_oneshot(model, [_decoder_calib()], method="sparsegpt", sparsity=0.5)
    assert calls["n"] == 9
    assert_same(model, before)
    assert _no_masks(model)


def _tree(root: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(
    "target,n",
    [
        ("oneshot.prune_linear", 9),  # pruning block 1, block 0 already written
        ("offload._Writer.write", 3),  # between two tensor writes
        ("offload._fsync_tree", 1),  # everything written, before the rename
    ],
)
def test_prune_checkpoint_interrupted_leaves_no_output_and_input_untouched(tmp_path, target, n, monkeypatch):
    from secateur.llm import prune_checkpoint

    torch.manual_seed(0)
    src = tmp_path / "in"
    hf_models.llama()[0].save_pretrained(src, max_shard_size="40KB")
    inputs = _tree(src)
    listing = sorted(os.listdir(tmp_path))
    calls = _raise_on_call(monkeypatch, *_target(target), n, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoint(src, tmp_path / "out", [_decoder_calib()], "wanda", 0.5)
    assert calls["n"] == n
    assert sorted(os.listdir(tmp_path)) == listing  # no out/, no hidden partial folder
    assert _tree(src) == inputs  # same bytes, not even rewritten
    monkeypatch.undo()
    prune_checkpoint(src, tmp_path / "out", [_decoder_calib()], "wanda", 0.5)  # then it works
    assert sorted(os.listdir(tmp_path)) == sorted([*listing, "out"])


def test_fbs_install_interrupted_puts_the_original_modules_back(monkeypatch):
    from secateur.methods.fbs import FBS
    from secateur.zoo import create_model

    torch.manual_seed(0)
    model = create_model("resnet8", width=0.5).eval()
    x = torch.randn(2, 1, 16, 16)
    before = snapshot(model)
    modules = dict(model.named_modules())
    _raise_on_call(monkeypatch, *_target("fbs.FBS._outputs"), 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):  # in the check after the swap
        FBS(model, density=0.5, example_inputs=x)
    assert dict(model.named_modules()) == modules
    assert_same(model, before)


def test_fisher_prune_one_interrupted_keeps_model_hooks_and_statistics(monkeypatch):
    import torch.nn.functional as nnf

    from secateur.methods.fisher_prune import FisherPruner
    from secateur.zoo import create_model

    torch.manual_seed(0)
    model = create_model("resnet8", width=0.5)
    x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,))
    pruner = FisherPruner(model, x[:2])
    nnf.cross_entropy(model(x), y).backward()
    pruner.update()
    fisher = {k: v.clone() for k, v in pruner.scores().items()}
    model.eval()
    before = snapshot(model)
    _raise_on_call(monkeypatch, Journal, "set_attr", 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        pruner.prune_one()
    assert_same(model, {**before, "hooks": snapshot(model)["hooks"]})  # hooks: new handles, checked below
    s = pruner.scores()
    assert s.keys() == fisher.keys() and all(torch.equal(s[k], fisher[k]) for k in s)
    assert len(pruner._handles) == len(pruner.points)  # its hooks are back
    monkeypatch.undo()
    pruner.prune_one()
    assert len(pruner.removed) == 1
