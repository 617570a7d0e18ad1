"""Channel pruning through recurrent layers (secateur.graph.rules_recurrent): nn.LSTM / nn.GRU / nn.RNN (and
their cells and the torch._VF ops they call), compacted under the oracle.

What is proven: the input features of a recurrent layer go with its producer's channels, the hidden units
are one group across gates, layers and directions (the kept rows of every gate block are the same units, in
order), the LSTM projection units are a second group, ``input_size`` / ``hidden_size`` / ``proj_size`` are
rewritten, the compacted model equals the masked one in float64 and runs under the module's own checks, an
initial state without channel identity freezes the hidden units, and any exception or KeyboardInterrupt
during compaction leaves the model as it was.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import secateur.compact.apply as apply_mod
from secateur import prune_channels
from secateur.compact import Journal, check_equivalence, compact, make_plan, mask_model
from secateur.errors import CompactionError
from secateur.graph import DependencyGraph

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN"),
]

VOCAB, EMB, HID, TAGS = 40, 16, 12, 5


class Tagger(nn.Module):
    """Embedding -> recurrent layer (batch_first, bidirectional, 2 layers) -> per-token Linear."""

    def __init__(self, cls: type = nn.LSTM, proj: int = 0, **kw: Any) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, EMB)
        extra = {"proj_size": proj} if proj else {}
        self.rnn = cls(EMB, HID, num_layers=2, batch_first=True, bidirectional=True, **extra, **kw)
        self.head = nn.Linear(2 * (proj or HID), TAGS)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(self.emb(ids))
        return self.head(y)


def _ids(n: int = 3, t: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(1))


def _rnn_params(gates: int, inp: int, hid: int, layers: int, dirs: int, proj: int = 0) -> int:
    """Parameter count of an nn.LSTM/GRU/RNN (with biases), from its sizes."""
    out = proj or hid
    n = 0
    for k in range(layers):
        layer_in = inp if k == 0 else dirs * out
        n += dirs * (gates * hid * (layer_in + out + 2) + proj * hid)
    return n


def _prune_and_oracle(model: nn.Module, x: Any, sparsity: float = 0.4) -> tuple[nn.Module, dict]:
    """prune_channels (with its own float64 oracle), then the oracle again from the plan: the original model
    masked with the plan equals the compacted one in float64."""
    original = copy.deepcopy(model)
    pruned, plan = prune_channels(model, x, sparsity)
    masked = mask_model(original, plan)
    check_equivalence(masked, pruned, x)
    with torch.no_grad():
        xs = tuple(t.double() if t.is_floating_point() else t for t in (x if isinstance(x, tuple) else (x,)))
        a, b = copy.deepcopy(masked).double()(*xs), copy.deepcopy(pruned).double()(*xs)
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    return pruned, plan


@pytest.mark.parametrize("cls, gates", [(nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)])
def test_tagger_prunes_through_the_recurrent_layer(cls, gates):
    torch.manual_seed(0)
    model = Tagger(cls).eval()
    x = _ids()
    graph = DependencyGraph.build(model, x)
    hidden = next(g for g in graph.groups if any(m.name == "rnn.weight_hh_l0" for m in g.members))
    members = {(m.name, m.dim) for m in hidden.members}
    assert hidden.n_units == HID and hidden.n_prunable == HID
    for sfx in ("l0", "l0_reverse", "l1", "l1_reverse"):  # every gate row-block, hh rows and columns
        assert {
            (f"rnn.weight_ih_{sfx}", 0),
            (f"rnn.weight_hh_{sfx}", 0),
            (f"rnn.weight_hh_{sfx}", 1),
        } <= members
        assert {(f"rnn.bias_ih_{sfx}", 0), (f"rnn.bias_hh_{sfx}", 0)} <= members
    assert {("rnn.weight_ih_l1", 1), ("rnn.weight_ih_l1_reverse", 1), ("head.weight", 1)} <= members
    features = graph.group_of("emb.weight", 1)
    assert {(m.name, m.dim) for m in features.members} >= {
        ("rnn.weight_ih_l0", 1),
        ("rnn.weight_ih_l0_reverse", 1),
    }

    pruned, plan = _prune_and_oracle(model, x)
    h, i = HID - int(0.4 * HID), EMB - int(0.4 * EMB)
    rnn = pruned.rnn
    assert (rnn.hidden_size, rnn.input_size, pruned.head.in_features) == (h, i, 2 * h)
    expected = VOCAB * i + _rnn_params(gates, i, h, 2, 2) + 2 * h * TAGS + TAGS
    assert sum(p.numel() for p in pruned.parameters()) == expected
    # the gates stay aligned: the kept rows of every gate block are the same hidden units, in order
    units = np.asarray(plan["tensors"]["rnn.weight_hh_l0"]["1"])
    rows = np.asarray(plan["tensors"]["rnn.weight_ih_l1_reverse"]["0"])
    assert units.size == h and rows.tolist() == [g * HID + u for g in range(gates) for u in units]
    # the module's own checks: an explicit state of the new size is accepted, one of the old size refused
    rnn.flatten_parameters()
    h0 = torch.zeros(4, 3, h)
    state = (h0, torch.zeros(4, 3, h)) if cls is nn.LSTM else h0
    with torch.no_grad():
        y, _ = rnn(pruned.emb(x), state)
        assert torch.equal(y, rnn(pruned.emb(x))[0])
        with pytest.raises(RuntimeError, match="hidden"):
            rnn(pruned.emb(x), (torch.zeros(4, 3, HID),) * 2 if cls is nn.LSTM else torch.zeros(4, 3, HID))


def test_lstm_projection_units_are_a_second_group():
    """proj_size: the hidden units (gate rows, weight_hr columns, c_n) and the projection units (weight_hr
    rows, weight_hh columns, h_n, the output, the next layer's input) are pruned separately."""
    torch.manual_seed(0)
    model, x = Tagger(nn.LSTM, proj=6).eval(), _ids()
    graph = DependencyGraph.build(model, x)
    proj = graph.group_of("rnn.weight_hr_l0", 0)
    hidden = graph.group_of("rnn.weight_hr_l0", 1)
    assert proj is not hidden and (proj.n_units, hidden.n_units) == (6, HID)
    assert ("rnn.weight_hh_l1_reverse", 1) in {(m.name, m.dim) for m in proj.members}
    assert ("rnn.weight_hh_l1_reverse", 0) in {(m.name, m.dim) for m in hidden.members}
    pruned, _ = _prune_and_oracle(model, x)
    h, p, i = HID - int(0.4 * HID), 6 - int(0.4 * 6), EMB - int(0.4 * EMB)
    assert (pruned.rnn.hidden_size, pruned.rnn.proj_size, pruned.rnn.input_size) == (h, p, i)
    assert sum(t.numel() for t in pruned.rnn.parameters()) == _rnn_params(4, i, h, 2, 2, proj=p)


class Wrap(nn.Module):
    """Linear -> recurrent layer -> Linear on its output (time-major or unbatched input)."""

    def __init__(self, rnn: nn.Module, out: int) -> None:
        super().__init__()
        self.inp, self.rnn, self.head = nn.Linear(6, EMB), rnn, nn.Linear(out, TAGS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(torch.tanh(self.inp(x)))[0])


@pytest.mark.parametrize(
    "make, out, sizes",
    [
        (lambda: nn.LSTM(EMB, 10, num_layers=3, bias=False, proj_size=4), 4, (6, 3)),
        (lambda: nn.LSTM(EMB, 10, bias=False, proj_size=4, bidirectional=True), 8, (6, 3)),
        (lambda: nn.GRU(EMB, 10, num_layers=3), 10, (6, 0)),
        (lambda: nn.RNN(EMB, 10, nonlinearity="relu", bidirectional=True), 20, (6, 0)),
        (lambda: SubclassedLSTM(EMB, 10, proj_size=4, bidirectional=True), 8, (10, 4)),  # the _VF op rule
    ],
    ids=["lstm-3-layers-no-bias-proj", "lstm-bidir-no-bias-proj", "gru-3-layers", "rnn-relu-bidir", "vf-op"],
)
@pytest.mark.parametrize("unbatched", [False, True])
def test_layouts(make, out, sizes, unbatched):
    """bias=False, proj_size (weights w_ih, w_hh, w_hr per layer), 3 layers, relu, time-major and unbatched
    inputs, and the op rule's layout inference: pruned at 40% under prune_channels' oracle."""
    torch.manual_seed(0)
    model = Wrap(make(), out).eval()
    x = torch.randn(5, 6) if unbatched else torch.randn(5, 2, 6)
    pruned, _ = prune_channels(model, x, 0.4)
    assert (pruned.rnn.input_size, pruned.rnn.hidden_size, pruned.rnn.proj_size) == (EMB - 6, *sizes)


class FinalState(nn.Module):
    """Classifies a sequence from h_n and c_n (time-major, one direction, 2 layers) beside the outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, EMB)
        self.rnn = nn.LSTM(EMB, HID, num_layers=2)
        self.head = nn.Linear(3 * HID, TAGS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, (h, c) = self.rnn(torch.relu(self.inp(x)))
        return self.head(torch.cat([y[-1], h[0], c[-1]], dim=-1))


def test_final_states_consumed_downstream_are_sliced_with_the_hidden_units():
    torch.manual_seed(0)
    model, x = FinalState().eval(), torch.randn(5, 2, 6)
    pruned, _ = _prune_and_oracle(model, x)
    h = HID - int(0.4 * HID)
    assert pruned.rnn.hidden_size == h and pruned.head.in_features == 3 * h


class Packed(nn.Module):
    """Variable-length sequences through pack_padded_sequence / pad_packed_sequence (unsorted lengths)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, EMB)
        self.rnn = nn.GRU(EMB, HID, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * HID, TAGS)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        p = pack_padded_sequence(self.emb(ids), lengths, batch_first=True, enforce_sorted=False)
        y, _ = pad_packed_sequence(self.rnn(p)[0], batch_first=True, padding_value=-1.0)
        return self.head(y)


def test_packed_sequences_are_pruned():
    torch.manual_seed(0)
    model, x = Packed().eval(), (_ids(), torch.tensor([7, 3, 5]))
    pruned, _ = _prune_and_oracle(model, x)
    h = HID - int(0.4 * HID)
    assert (pruned.rnn.hidden_size, pruned.rnn.input_size) == (h, EMB - int(0.4 * EMB))
    assert pruned(*x).shape == (3, 7, TAGS)


class GivenState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, EMB)
        self.rnn = nn.GRU(EMB, HID)
        self.head = nn.Linear(HID, TAGS)

    def forward(self, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.inp(x), h0)[0])


def test_an_initial_state_without_channel_identity_freezes_the_hidden_units():
    """h_0 passed in as data: pruning hidden units would need a smaller input, so they stay (named)."""
    model, x = GivenState().eval(), (torch.randn(5, 2, 6), torch.randn(1, 2, HID))
    graph = DependencyGraph.build(model, x)
    hidden = graph.group_of("rnn.weight_hh_l0", 1)
    assert hidden.n_prunable == 0 and "h_0" in hidden.reasons[0] and "rnn" in hidden.reasons[0]
    pruned, _ = _prune_and_oracle(model, x)
    assert (pruned.rnn.hidden_size, pruned.rnn.input_size) == (HID, EMB - int(0.4 * EMB))


class SubclassedLSTM(nn.LSTM):
    """A subclass: no module rule matches its exact type, so the trace goes through the torch._VF op."""


def test_the_functional_op_rule_prunes_input_features_and_freezes_a_built_state():
    torch.manual_seed(0)
    model = Tagger().eval()
    model.rnn = SubclassedLSTM(EMB, HID, num_layers=2, batch_first=True, bidirectional=True)
    x = _ids()
    hidden = DependencyGraph.build(model, x).group_of("rnn.weight_hh_l0", 1)
    assert hidden.n_prunable == 0 and "op 'lstm'" in hidden.reasons[0]
    pruned, _ = _prune_and_oracle(model, x)
    assert (pruned.rnn.hidden_size, pruned.rnn.input_size) == (HID, EMB - int(0.4 * EMB))


class CellLoop(nn.Module):
    """An LSTMCell unrolled by hand, then a GRUCell on its states."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, EMB)
        self.cell = nn.LSTMCell(EMB, HID)
        self.cell2 = nn.GRUCell(HID, 8)
        self.head = nn.Linear(8, TAGS)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e, state, g, outs = self.emb(ids), None, None, []
        for t in range(ids.shape[1]):
            state = self.cell(e[:, t], state)
            g = self.cell2(state[0], g)
            outs.append(self.head(g))
        return torch.stack(outs, 1)


def test_cells_unrolled_by_hand_are_pruned():
    torch.manual_seed(0)
    model, x = CellLoop().eval(), _ids()
    pruned, _ = _prune_and_oracle(model, x)
    c, c2 = pruned.cell, pruned.cell2
    h, i = HID - int(0.4 * HID), EMB - int(0.4 * EMB)
    assert (c.input_size, c.hidden_size, c2.input_size, c2.hidden_size) == (i, h, h, 8 - int(0.4 * 8))
    assert tuple(c.weight_ih.shape) == (4 * h, i) and tuple(c2.weight_hh.shape) == (3 * 5, 5)


# ------------------------------------------------------------------------------------------------------
# fault injection: every step of compaction, an exception and a KeyboardInterrupt
# ------------------------------------------------------------------------------------------------------
def _state(m: nn.Module) -> dict[str, Any]:
    plain = (int, float, bool, str, tuple, type(None))
    return {
        "tensors": {k: (v.detach().clone(), v.data_ptr()) for k, v in m.state_dict().items()},
        "params": [id(p) for p in m.parameters()],
        "flat": [id(w) for w in m.rnn._flat_weights],
        "attrs": {
            p: {k: v for k, v in vars(x).items() if isinstance(v, plain)} for p, x in m.named_modules()
        },
    }


def _assert_same(m: nn.Module, before: dict[str, Any], where: str) -> None:
    now = _state(m)
    assert now["attrs"] == before["attrs"] and now["params"] == before["params"], where
    assert now["flat"] == before["flat"], where
    for k, (v, ptr) in before["tensors"].items():
        assert torch.equal(now["tensors"][k][0], v) and now["tensors"][k][1] == ptr, f"{where}: {k}"


def test_an_exception_at_any_step_of_compaction_leaves_the_lstm_identical(monkeypatch):
    torch.manual_seed(0)
    model, x = Tagger(nn.LSTM, proj=6).eval(), _ids()
    graph = DependencyGraph.build(model, x)
    plan = make_plan(
        graph, {gi: list(range(g.n_units // 3)) for gi, g in enumerate(graph.groups) if g.n_prunable}
    )
    steps: list[str] = []
    armed: dict[str, Any] = {"at": None, "exc": None}

    def step(kind: str) -> None:
        steps.append(kind)
        if armed["at"] == len(steps) - 1:
            raise armed["exc"]

    sliced, set_data, set_attr = apply_mod._sliced, Journal.set_data, Journal.set_attr
    monkeypatch.setattr(apply_mod, "_sliced", lambda t, d, *s: (step("slice"), sliced(t, d, *s))[1])
    monkeypatch.setattr(Journal, "set_data", lambda self, t, new: (set_data(self, t, new), step("data")))
    monkeypatch.setattr(
        Journal, "set_attr", lambda self, o, n, v: (set_attr(self, o, n, v), step(f"attr {n}"))
    )
    reference = mask_model(copy.deepcopy(model), plan)
    compact(copy.deepcopy(model), plan)  # count the steps on a copy
    kinds = list(steps)
    assert {"attr hidden_size", "attr input_size", "attr proj_size"} <= set(kinds)
    before = _state(model)
    for k in range(len(kinds)):
        for exc in (RuntimeError(f"injected at {k}"), KeyboardInterrupt()):
            steps.clear()
            armed.update(at=k, exc=exc)
            with pytest.raises(KeyboardInterrupt if isinstance(exc, KeyboardInterrupt) else CompactionError):
                compact(model, plan)
            _assert_same(model, before, f"{type(exc).__name__} at step {k} ({kinds[k]})")
    armed["at"] = None
    compact(model, plan)
    check_equivalence(reference, model, x)
    assert model.rnn.hidden_size == HID - HID // 3
