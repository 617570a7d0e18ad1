"""Coupling rules of recurrent layers: ``nn.LSTM``, ``nn.GRU``, ``nn.RNN``, their cells, and the functional
ops they call (``torch._VF.lstm``, ``gru``, ``rnn_tanh``, ``rnn_relu`` and the ``*_cell`` ops).

What is coupled, for a layer with ``G`` gates (LSTM 4: i, f, g, o; GRU 3: r, z, n; RNN 1), hidden size ``H``,
``D`` directions (2 if bidirectional), ``L`` layers and optional LSTM projection size ``P``:

* **input features**: the columns of ``weight_ih_l0`` (and ``weight_ih_l0_reverse``) are the channels of the
  input's last dim (its producer's output channels);
* **hidden units** (``H`` units, one group): unit ``j`` owns rows ``g*H + j`` of every gate block of
  ``weight_ih_lk``, ``weight_hh_lk``, ``bias_ih_lk`` and ``bias_hh_lk`` (so the gates of a unit stay aligned:
  compaction keeps the same ``j`` in every block, in order), column ``j`` of ``weight_hh_lk`` (without
  projection) or of ``weight_hr_lk`` (with one), the last dim of ``c_n`` and, without projection, of
  ``h_n``;
* **output units** (the hidden units, or with ``proj_size`` the ``P`` projection units, a second group): the
  rows of ``weight_hr_lk``, the columns of ``weight_hh_lk``, the last dim of ``h_n`` and of the output
  (``D`` copies: forward then backward half) and the columns of the next layer's ``weight_ih`` (also ``D``
  halves).

Unit ``j`` is one unit across every layer and both directions of one module: ``nn.LSTM`` and friends have a
single ``hidden_size`` (and ``proj_size``), and ``h_n`` / ``c_n`` stack every layer and direction on one
hidden dim, so independent groups could not be compacted into a valid module. The time (sequence) and batch
dims are never channels: atoms on them are frozen.

The modules are handled by module rules (:func:`recurrent_module_rule`): their default zero initial state
is built from ``hidden_size`` and shrinks with it. A user-given ``hx`` is coupled to the hidden/output units,
and one without channel identity (a model input, a constant) freezes them. Called directly, the ``_VF`` ops
(:func:`recurrent_op_rule`, :func:`recurrent_cell_rule`) see their state as a tensor: one built from a
constant size is frozen the same way. ``pack_padded_sequence`` / ``pad_packed_sequence`` pass the feature
dims through (:func:`pack_padded_rule`, :func:`pad_packed_rule`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from secateur._torch import iter_tensors
from secateur.graph.atoms import Atoms
from secateur.graph.rules import register_module_rule, register_rule
from secateur.graph.tracer import OpContext

__all__ = [
    "GATES",
    "couple_recurrent",
    "pack_padded_rule",
    "pad_packed_rule",
    "recurrent_cell_module_rule",
    "recurrent_cell_rule",
    "recurrent_module_rule",
    "recurrent_op_rule",
]

#: Gate blocks stacked along the rows of ``weight_ih`` / ``weight_hh``, by ``_VF`` op or ``RNNBase.mode``.
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1, "LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_CELL_GATES = {"lstm_cell": 4, "gru_cell": 3, "rnn_tanh_cell": 1, "rnn_relu_cell": 1}


def _bind(ctx: OpContext, t: Any, bind: dict[int, Atoms | None], why: str) -> None:
    """Make dim ``d`` of parameter ``t`` the channels ``bind[d]``: bound when first seen, else coupled
    (``None`` freezes the parameter's dim with ``why``)."""
    if not isinstance(t, torch.Tensor):
        return
    dims, bound = ctx.dims_binding(t, {d: a for d, a in bind.items() if a is not None})
    for d, a in bind.items():
        if d not in bound and t.shape[d] > 1:
            ctx.couple(a, dims[d], why)


def _freeze_non_feature(ctx: OpContext, t: torch.Tensor, why: str) -> None:
    """Freeze channel atoms on every dim of ``t`` but the last (time, batch, layer dims of a recurrent
    layer's tensors)."""
    for d in ctx.dims(t)[:-1]:
        ctx.freeze(d, why)


def _couple_state(ctx: OpContext, state: Any, units: Atoms | None, what: str) -> None:
    """Couple the last dim of an initial state tensor (``h_0`` / ``c_0``) with ``units``."""
    if not isinstance(state, torch.Tensor) or units is None:
        return
    _freeze_non_feature(ctx, state, f"layer/batch dim of a recurrent {what}")
    if state.shape[-1] > 1:
        ctx.couple(
            units,
            ctx.dims(state)[-1],
            f"recurrent initial state {what} without channel identity (a model input or a constant)",
        )


def _set_last(ctx: OpContext, out: Any, last: Atoms | None) -> None:
    """Output ``out``: channels ``last`` on its last dim, none elsewhere."""
    if isinstance(out, torch.Tensor):
        ctx.set_dims(out, [None] * (out.dim() - 1) + [last if out.shape[-1] > 1 else None])


def couple_recurrent(
    ctx: OpContext,
    gates: int,
    x: torch.Tensor,
    hx: Sequence[Any],
    weights: Sequence[Any],
    names: Sequence[str] | None,
    num_layers: int,
    bidirectional: bool,
) -> tuple[Atoms, Atoms]:
    """Couple the channels of one multi-layer recurrent layer (module docstring); returns the atoms of the
    hidden units (shape ``(H,)``) and of the output units (``(P,)`` with a projection, else the same array).

    ``x``: the input (``(..., input_size)``; packed data ``(sum T, input_size)``); ``hx``: the initial states
    given (``h_0`` and, for an LSTM, ``c_0``; ``None`` entries for the default zeros); ``weights``: the flat
    weight list in ``nn.RNNBase`` order (per layer, per direction: ``w_ih, w_hh[, b_ih, b_hh][, w_hr]``);
    ``names``: their parameter names (``_flat_weights_names``) or ``None`` to infer the layout from the count.
    """
    n_dir = 2 if bidirectional else 1
    per = len(weights) // (num_layers * n_dir)
    if names is not None:
        proj = any(n.startswith("weight_hr") for n in names)
    else:
        proj = per in (3, 5)  # w_ih, w_hh[, b_ih, b_hh], w_hr
    h_units = ctx.new_atoms(int(weights[0].shape[0]) // gates)
    out_units = ctx.new_atoms(int(weights[per - 1].shape[0])) if proj else h_units
    rows = np.tile(h_units, gates)  # gate-major rows: unit j is row g*H + j of every gate block
    out_cat = np.tile(out_units, n_dir)  # the output's last dim: forward half, then backward half
    _freeze_non_feature(ctx, x, "time/batch dim of a recurrent layer's input (the recurrence mixes it)")
    xin = ctx.dims(x)[-1] if x.shape[-1] > 1 else None
    for k in range(num_layers * n_dir):
        ws = list(weights[k * per : (k + 1) * per])
        layer_in = xin if k < n_dir else out_cat
        why = "input of a recurrent layer without channel identity (a model input or a constant)"
        _bind(ctx, ws[0], {0: rows, 1: layer_in}, why)  # weight_ih: (G*H, in)
        _bind(ctx, ws[1], {0: rows, 1: out_units}, why)  # weight_hh: (G*H, H or P)
        for b in ws[2 : per - 1 if proj else per]:  # bias_ih, bias_hh: (G*H,)
            _bind(ctx, b, {0: rows}, why)
        if proj:  # weight_hr: (P, H)
            _bind(ctx, ws[-1], {0: out_units, 1: h_units}, why)
    if len(hx) > 0:
        _couple_state(ctx, hx[0], out_units, "h_0")
    if len(hx) > 1:
        _couple_state(ctx, hx[1], h_units, "c_0")
    return h_units, out_units


def recurrent_op_rule(ctx: OpContext) -> None:
    """``torch._VF.lstm / gru / rnn_tanh / rnn_relu``, dense ``(input, hx, params, has_biases, num_layers,
    dropout, train, bidirectional, batch_first)`` or packed ``(data, batch_sizes, hx, params, ...)``: outputs
    ``(output, h_n[, c_n])`` with the output units on the last dim of ``output`` (``D`` halves) and ``h_n``,
    the hidden units on ``c_n``'s."""
    a = ctx.args
    packed = isinstance(a[1], torch.Tensor) and not a[1].is_floating_point()
    off = 1 if packed else 0
    hx = a[1 + off]
    hx = list(hx) if isinstance(hx, (list, tuple)) else [hx]
    weights = list(a[2 + off])
    num_layers, bidirectional = int(a[4 + off]), bool(a[7 + off])
    h, o = couple_recurrent(ctx, GATES[ctx.name], a[0], hx, weights, None, num_layers, bidirectional)
    outs = list(ctx.out)
    _set_last(ctx, outs[0], np.tile(o, 2 if bidirectional else 1))
    _set_last(ctx, outs[1], o)
    if len(outs) > 2:
        _set_last(ctx, outs[2], h)


def recurrent_cell_rule(ctx: OpContext) -> None:
    """``torch._VF.lstm_cell / gru_cell / rnn_tanh_cell / rnn_relu_cell(input, hx, w_ih, w_hh, b_ih,
    b_hh)``: one step; outputs ``h'`` (and ``c'`` for the LSTM cell), hidden units on their last dim."""
    x, hx = ctx.args[0], ctx.arg(1, "hx")
    hx = list(hx) if isinstance(hx, (list, tuple)) else [hx]
    weights = [ctx.arg(i, n) for i, n in enumerate(("w_ih", "w_hh", "b_ih", "b_hh"), start=2)]
    weights = [w for w in weights if isinstance(w, torch.Tensor)]
    h, _ = couple_recurrent(ctx, _CELL_GATES[ctx.name], x, hx, weights, None, 1, False)
    for out in iter_tensors(ctx.out):
        _set_last(ctx, out, h)


def _module_inputs(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    x = args[0] if args else kwargs.get("input")
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    return x, hx


def recurrent_module_rule(ctx: OpContext, mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
    """``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` as one op (dense or ``PackedSequence`` input, any
    ``batch_first``, ``bidirectional``, ``num_layers``, ``proj_size``): output ``(output, h_n)`` or
    ``(output, (h_n, c_n))``. The default initial state (``hx=None``) takes no part: it is built from
    ``hidden_size``, which compaction updates."""
    x, hx = _module_inputs(args, kwargs)
    if isinstance(x, PackedSequence):
        x = x.data
    states = [] if hx is None else (list(hx) if isinstance(hx, (list, tuple)) else [hx])
    names = list(mod._flat_weights_names)
    weights = [getattr(mod, n) for n in names]
    h, o = couple_recurrent(
        ctx, GATES[mod.mode], x, states, weights, names, mod.num_layers, mod.bidirectional
    )
    y, state = out
    _set_last(ctx, y.data if isinstance(y, PackedSequence) else y, np.tile(o, 2 if mod.bidirectional else 1))
    if isinstance(state, (list, tuple)):
        _set_last(ctx, state[0], o)
        _set_last(ctx, state[1], h)
    else:
        _set_last(ctx, state, o)


def recurrent_cell_module_rule(ctx: OpContext, mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
    """``nn.LSTMCell`` / ``nn.GRUCell`` / ``nn.RNNCell`` as one op: output ``h'`` or ``(h', c')`` with the
    hidden units on the last dim; the default zero state (``hx=None``) takes no part."""
    x, hx = _module_inputs(args, kwargs)
    states = [] if hx is None else (list(hx) if isinstance(hx, (list, tuple)) else [hx])
    gates = {nn.LSTMCell: 4, nn.GRUCell: 3}.get(type(mod), 1)
    weights = [w for w in (mod.weight_ih, mod.weight_hh, mod.bias_ih, mod.bias_hh) if w is not None]
    h, _ = couple_recurrent(ctx, gates, x, states, weights, None, 1, False)
    for t in iter_tensors(out):
        _set_last(ctx, t, h)


def pack_padded_rule(ctx: OpContext) -> None:
    """``_pack_padded_sequence(input (T, B, *F) or (B, T, *F), lengths, batch_first)`` -> ``(data (sum T,
    *F), batch_sizes)``: the feature dims pass through; channels on the time/batch dims are frozen (they are
    merged into the packed dim)."""
    dims = ctx.dims(ctx.args[0])
    for d in dims[:2]:
        ctx.freeze(d, "time/batch dim packed into a PackedSequence")
    data, sizes = list(ctx.out)[:2]
    ctx.set_dims(data, [None] + list(dims[2:]))
    ctx.set_dims(sizes, [None] * sizes.dim())


def pad_packed_rule(ctx: OpContext) -> None:
    """``_pad_packed_sequence(data (sum T, *F), batch_sizes, batch_first, padding_value, total_length)`` ->
    ``(padded (T, B, *F) or (B, T, *F), lengths)``: the feature dims pass through (padding is per position, a
    constant in every channel: a pruned channel's padding is never read)."""
    dims = ctx.dims(ctx.args[0])
    ctx.freeze(dims[0] if dims else None, "packed time/batch dim of a PackedSequence")
    padded, lengths = list(ctx.out)[:2]
    ctx.set_dims(padded, [None, None] + list(dims[1:]))
    ctx.set_dims(lengths, [None] * lengths.dim())


register_rule("pack_padded_sequence", pack_padded_rule)
register_rule("pad_packed_sequence", pad_packed_rule)
register_rule(["lstm", "gru", "rnn_tanh", "rnn_relu"], recurrent_op_rule)
register_rule(list(_CELL_GATES), recurrent_cell_rule)
for _cls in (nn.LSTM, nn.GRU, nn.RNN):
    register_module_rule(_cls, recurrent_module_rule)
for _cls in (nn.LSTMCell, nn.GRUCell, nn.RNNCell):
    register_module_rule(_cls, recurrent_cell_module_rule)
