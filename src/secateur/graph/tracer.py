"""One real forward pass under a ``TorchFunctionMode`` that records channel couplings.

Why this design: a ``TorchFunctionMode`` sees every torch-level call (functional ops, Tensor methods,
operators) whatever Python control flow ran, needs no ``requires_grad`` and costs about one forward pass;
by default the pass runs on ``meta`` tensors so it computes nothing (a real pass is the fallback for models
whose Python code reads tensor values). Module hooks give every op the path of the module where it ran.

Here: the tracer (:func:`run_trace`, :class:`Tracer`, the :class:`OpContext` a coupling rule sees, and the
records it leaves: :class:`ParamDim`, :class:`SplitEvent`). The shape-only results of ops during a meta trace
are in :mod:`secateur.graph.shapes`; calling a model on example inputs and finding the tensors in nested
values are in :mod:`secateur._torch`.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from secateur._torch import as_examples, call_model, list_tensors, op_name
from secateur._validate import check_model
from secateur.errors import GraphError, SecateurError, UnsupportedOpError
from secateur.graph.atoms import Atoms, AtomStore
from secateur.graph.shapes import meta_result
from secateur.graph.symbolic import SHAPE_OPS, AttributeTracing, Size, SymbolicTrace, traced_shape
from secateur.graph.validate import check_embedding_indices, integer_inputs

Dims = list  # list[Atoms | None], one entry per tensor dimension


@dataclasses.dataclass
class ParamDim:
    """One dimension of one parameter or buffer taking part in the graph."""

    name: str  # canonical qualname ("layer1.0.conv1.weight")
    dim: int
    atoms: Atoms  # shape (size,)
    aliases: tuple[str, ...] = ()  # other qualnames of the same tensor (tied weights)
    is_buffer: bool = False


@dataclasses.dataclass
class SplitEvent:
    """A reshape that cut a channel dimension into (units, inner): attention heads, norm groups."""

    module_paths: tuple[str, ...]  # innermost module first
    n_outer: int  # number of units before pruning (e.g. num_heads)
    inner: int  # size of one unit (e.g. head_dim)
    atoms: Atoms  # shape (n_outer,), one atom per unit
    op: str
    kind: str = "heads"  # "heads" (a view of a channel dim) or "groups" (group_norm)
    classes: np.ndarray | None = None  # atom classes of the units, filled when the graph is solved


class OpContext:
    """What a coupling rule sees of one op, and the actions it may take.

    Attributes: ``name`` (registry key), ``func``, ``args``, ``kwargs``, ``out`` (the op's result),
    ``module_path`` (qualname of the innermost running module, ``""`` for the root).
    """

    def __init__(self, tracer: Tracer, func: Any, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        self.tracer = tracer
        self.func = func
        self.name = name
        self.args = args
        self.kwargs = kwargs
        self.out = out

    # --- reading -------------------------------------------------------------------------------------
    @property
    def module_path(self) -> str:
        return self.tracer.module_path()

    def where(self) -> str:
        """``"op 'x' in module 'a.b' (Class)"``, for messages."""
        return self.tracer.where(self.name)

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """Positional argument ``i`` or keyword ``name``."""
        if len(self.args) > i:
            return self.args[i]
        return self.kwargs.get(name, default)

    def dims(self, t: Any) -> Dims:
        """Atoms per dimension of a tensor (``None`` for non-channel dims); ``[]`` for a non-tensor."""
        return self.tracer.dims(t)

    def dims_binding(self, t: Any, bind: dict[int, Atoms | None]) -> tuple[Dims, set[int]]:
        """:meth:`dims`, where a parameter seen for the first time takes the atoms ``bind[d]`` for its dims
        ``d`` (what coupling fresh atoms to them would give); returns the dims and the dims bound."""
        return self.tracer.dims_binding(t, bind)

    def has_atoms(self, t: Any) -> bool:
        return any(d is not None for d in self.dims(t))

    def param_name(self, t: torch.Tensor) -> str | None:
        """Qualname if ``t`` is a parameter or buffer of the model, else ``None``."""
        return self.tracer.param_name(t)

    def is_param_derived(self, t: Any) -> bool:
        """True if ``t`` is a parameter/buffer or computed from them alone (a weight, not an activation)."""
        return self.tracer.is_param_derived(t)

    # --- writing ------------------------------------------------------------------------------------
    def set_dims(self, t: Any, dims: Sequence[Atoms | None]) -> None:
        """Give the output tensor ``t`` its atoms per dimension (``len(dims) == t.dim()``)."""
        if isinstance(t, torch.Tensor):
            dims = list(dims)
            if len(dims) != t.dim():
                raise GraphError(
                    f"rule for {self.where()} produced {len(dims)} dims for a {t.dim()}-d output"
                )
            self.tracer.set_dims(t, dims)

    def couple(self, a: Atoms | None, b: Atoms | None, why: str = "") -> Atoms | None:
        """Declare two same-size dimensions the same channels; a channel dim coupled to a dim without
        channel identity (data, a constant) is frozen. Returns the array to use for the output, or None."""
        if a is None and b is None:
            return None
        if a is None or b is None:
            arr = a if a is not None else b
            self.freeze(arr, why or "coupled to a tensor without channel identity (model input or constant)")
            return arr
        if a.shape != b.shape and a.size != 1 and b.size != 1:
            raise GraphError(f"{self.where()}: coupling dims of sizes {a.size} and {b.size}")
        self.tracer.atoms.union(a, b)
        return a

    def union_rows(self, mat: np.ndarray) -> None:
        """Merge the atoms of each row of ``mat`` into one unit (whole heads, whole conv groups)."""
        self.tracer.atoms.union_rows(mat)

    def freeze(self, a: Atoms | None, reason: str) -> None:
        """Make these channels unprunable; ``reason`` is prefixed with where it happened."""
        if a is not None:
            self.tracer.atoms.freeze(a, f"{reason} [{self.where()}]")

    def new_atoms(self, k: int) -> Atoms:
        return self.tracer.atoms.new(k)

    def record_split(self, n_outer: int, inner: int, atoms: Atoms, kind: str = "heads") -> None:
        """Note that a channel dim was viewed as ``(n_outer, inner)`` units (heads); compaction updates the
        module attributes equal to ``n_outer`` (num_heads and the like)."""
        self.tracer.splits.append(
            SplitEvent(tuple(reversed(self.tracer.stack)), n_outer, inner, atoms.copy(), self.name, kind)
        )


Rule = Callable[[OpContext], None]
ModuleRule = Callable[["OpContext", nn.Module, tuple, dict, Any], None]


# Tensor metadata queries: they return sizes, dtypes or flags, never a tensor carrying channels.
_METADATA = frozenset(
    "dim size shape dtype device numel stride is_floating_point is_contiguous ndim ndimension layout "
    "is_complex requires_grad is_cuda is_meta nelement element_size".split()
)


# Ops that turn a tensor's values into a Python value: where a data-dependent branch may be decided.
_VALUE_READS = frozenset("bool item tolist int float index is_nonzero equal".split())
# Ops whose single output holds exactly the values of their first input (the out-of-vocabulary check follows
# integer inputs through them during a meta trace).
_SAME_VALUES = frozenset(
    "view reshape flatten contiguous unsqueeze squeeze clone long int to permute transpose t".split()
)


class _Mode(TorchFunctionMode):
    def __init__(self, tracer: Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        tr = self.tracer
        name = op_name(func)
        if name in _METADATA:  # x.dim(), x.shape...: no tensor out, nothing to record but the count
            out = func(*args, **kwargs)
            if not tr.opaque and (name == "shape" or name == "size") and args:
                dim = args[1] if len(args) > 1 else kwargs.get("dim")
                out = traced_shape(tr.size_leaf, args[0], out, dim)  # sizes that know their dim
            if not tr.opaque and not isinstance(out, torch.Tensor):
                tr.n_ops += 1
                return out
            if tr.opaque:
                return out
            tr.on_op(func, args, kwargs, out, name)
            return out
        if name == "embedding":
            tr.check_embedding(args, kwargs)
        out = None
        if tr.meta:
            out = meta_result(name, func, args, kwargs)  # shapes only, for ops with slow meta kernels
            if out is None:
                out = func(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        if tr.opaque:
            return out
        tr.on_op(func, args, kwargs, out, name)
        return out


class Tracer:
    """Runs the forward pass and holds the per-tensor atom bookkeeping. Use :func:`trace`."""

    def __init__(
        self, model: nn.Module, rules: dict[str, Rule], module_rules: dict[type, ModuleRule]
    ) -> None:
        self.model = model
        self.rules = rules
        self.module_rules = module_rules
        self.atoms = AtomStore()
        self._info: dict[int, tuple[weakref.ref, Dims]] = {}
        self._params: dict[int, tuple[torch.Tensor, str, bool]] = {}
        self._pderived: dict[int, weakref.ref] = {}
        self.aliases: dict[str, tuple[str, ...]] = {}
        self.param_dims: dict[tuple[str, int], ParamDim] = {}
        self.splits: list[SplitEvent] = []
        self.sym = SymbolicTrace()  # where the sizes given to shape ops come from (graph.symbolic)
        self.stack: list[str] = []
        self.module_stack: list[nn.Module] = []
        self.opaque = 0
        self.meta = False
        self.n_ops = 0
        self.modules: dict[str, nn.Module] = {}
        self.named: dict[str, torch.Tensor] = {}  # qualname -> the tensor the forward sees (meta stand-in)
        self.called: set[int] = set()  # ids of the modules whose forward ran
        self.value_reads: list[str] = []  # where the forward read tensor values (first few, distinct)
        # integer example inputs behind their meta stand-ins: id(meta) -> (meta, real, label)
        self.real_ints: dict[int, tuple[torch.Tensor, torch.Tensor, str]] = {}
        # untraced="freeze" (second trace): the dims of every tensor alive at the entry of, or made during,
        # a call of a watched module, per module path
        self.watch: frozenset[str] = frozenset()
        self.watched: dict[str, list[Dims]] = {}
        self._watch_log: list[Dims] = []
        self._watch_open: list[tuple[str, int]] = []

    # --- identities ---------------------------------------------------------------------------------
    def register_tensors(self, named: dict[str, torch.Tensor], buffers: set[str]) -> None:
        """Map the tensors the forward will see (real or meta stand-ins) to their qualnames."""
        by_id: dict[int, list[str]] = {}
        for name, t in named.items():
            by_id.setdefault(id(t), []).append(name)
        for names in by_id.values():
            t = named[names[0]]
            self._params[id(t)] = (t, names[0], names[0] in buffers)
            self.aliases[names[0]] = tuple(names[1:])

    def param_name(self, t: Any) -> str | None:
        rec = self._params.get(id(t))
        return rec[1] if rec is not None and rec[0] is t else None

    def is_param_derived(self, t: Any) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        if self.param_name(t) is not None:
            return True
        r = self._pderived.get(id(t))
        return r is not None and r() is t

    def param_atoms(self, name: str, dim: int, size: int, is_buffer: bool) -> Atoms:
        key = (name, dim)
        pd = self.param_dims.get(key)
        if pd is None:
            pd = ParamDim(name, dim, self.atoms.new(size), self.aliases.get(name, ()), is_buffer)
            self.param_dims[key] = pd
        return pd.atoms

    def dims(self, t: Any) -> Dims:
        if not isinstance(t, torch.Tensor):
            return []
        rec = self._info.get(id(t))
        if rec is not None and rec[0]() is t:
            return rec[1]
        prec = self._params.get(id(t))
        if prec is not None and prec[0] is t:
            _, name, is_buffer = prec
            if is_buffer and not t.is_floating_point():
                dims: Dims = [None] * t.dim()
            else:
                dims = [
                    self.param_atoms(name, d, s, is_buffer) if s > 1 else None for d, s in enumerate(t.shape)
                ]
            self.set_dims(t, dims)
            return dims
        return [None] * t.dim()

    def size_leaf(self, t: torch.Tensor, d: int) -> Size:
        """The symbolic size of dim ``d`` of ``t`` (its channel atoms), for ``x.shape`` reads."""
        return self.sym.size_leaf(self, t, d)

    def set_dims(self, t: torch.Tensor, dims: Dims) -> None:
        self._info[id(t)] = (weakref.ref(t), dims)
        if self._watch_open:
            self._watch_log.append(dims)

    def is_param(self, t: torch.Tensor) -> bool:
        rec = self._params.get(id(t))
        return rec is not None and rec[0] is t

    def param_seen(self, name: str) -> bool:
        """True if an op of the trace read parameter/buffer ``name`` (any of its qualnames)."""
        t = self.named.get(name)
        if t is None:
            return False
        rec = self._info.get(id(t))
        return rec is not None and rec[0]() is t

    def live_dims(self) -> list[Dims]:
        """Dims of every tensor alive now that carries atoms, parameters and buffers excluded."""
        out = []
        for ref, dims in list(self._info.values()):
            t = ref()
            if t is not None and not self.is_param(t) and any(d is not None for d in dims):
                out.append(dims)
        return out

    # --- checks on values ------------------------------------------------------------------------------
    def check_embedding(self, args: tuple, kwargs: dict) -> None:
        """Refuse (ConfigError) out-of-range ids for an ``embedding`` op: on real ids, or during a meta trace
        on the example input (or a view of it) behind the ids' stand-in."""
        ids = args[0] if args else kwargs.get("input")
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        if not isinstance(ids, torch.Tensor) or not isinstance(w, torch.Tensor) or ids.is_floating_point():
            return
        label = "the ids"
        if ids.is_meta:
            rec = self.real_ints.get(id(ids))
            if rec is None or rec[0] is not ids:
                return
            _, ids, label = rec
        else:
            rec = self.real_ints.get(id(ids))
            if rec is not None and rec[0] is ids:
                label = rec[2]
        check_embedding_indices(ids, int(w.shape[0]), label, self.where("embedding"))

    def _follow_ints(self, name: str, ins: list, outs: list) -> None:
        if name in _SAME_VALUES and len(outs) == 1 and ins:
            rec = self.real_ints.get(id(ins[0]))
            if rec is not None and rec[0] is ins[0]:
                self.real_ints[id(outs[0])] = (outs[0], rec[1], rec[2])

    def dims_binding(self, t: Any, bind: dict[int, Atoms | None]) -> tuple[Dims, set[int]]:
        """``dims(t)``, except that a parameter seen for the first time takes, for each dim ``d`` in
        ``bind``, the atoms ``bind[d]`` (same size) instead of fresh ones. Returns the dims and the set of
        dims bound.

        Binding a weight's dim to the atoms of the activation it meets is what ``couple`` of fresh atoms
        with them would give (index ``i`` is in the class of ``bind[d][i]``), without new atoms or edges
        for the union-find: a trace of a CNN allocates a third of the atoms. Atoms made later are numbered
        lower but in the same order, so classes keep their order (a class is labelled by its first atom,
        which is never a fresh parameter atom coupled to older ones)."""
        rec = self._info.get(id(t))
        if rec is not None and rec[0]() is t:
            return rec[1], set()
        prec = self._params.get(id(t))
        if prec is None or prec[0] is not t:
            return self.dims(t), set()
        _, name, is_buffer = prec
        if (is_buffer and not t.is_floating_point()) or any((name, d) in self.param_dims for d in bind):
            return self.dims(t), set()
        dims: Dims = []
        bound: set[int] = set()
        for d, size in enumerate(t.shape):
            a = bind.get(d)
            if size <= 1:
                dims.append(None)
            elif a is not None and a.shape == (size,):
                self.param_dims[(name, d)] = ParamDim(name, d, a, self.aliases.get(name, ()), is_buffer)
                dims.append(a)
                bound.add(d)
            else:
                dims.append(self.param_atoms(name, d, size, is_buffer))
        self.set_dims(t, dims)
        return dims, bound

    # --- where are we -------------------------------------------------------------------------------
    def module_path(self) -> str:
        return self.stack[-1] if self.stack else ""

    def where(self, name: str) -> str:
        path = self.module_path()
        cls = type(self.module_stack[-1]).__name__ if self.module_stack else type(self.model).__name__
        return f"op '{name}' in module '{path or '<root>'}' ({cls})"

    # --- the op hook --------------------------------------------------------------------------------
    def on_op(self, func: Any, args: tuple, kwargs: dict, out: Any, name: str | None = None) -> None:
        self.n_ops += 1
        if name is None:
            name = op_name(func)
        outs = list_tensors(out)
        if not outs and name != "setitem":
            if name in _VALUE_READS and len(self.value_reads) < 4:
                w = self.where(name)
                if w not in self.value_reads:
                    self.value_reads.append(w)
            return
        ins = list_tensors(args)
        if kwargs:
            ins += list_tensors(kwargs)
        if self.real_ints:
            self._follow_ints(name, ins, outs)
        if ins and all(self.is_param_derived(t) for t in ins):
            for t in outs:
                self._pderived[id(t)] = weakref.ref(t)
        if not any(any(d is not None for d in self.dims(t)) for t in ins):
            for t in outs:  # fresh tensors (or outputs of ops on data only): no channel identity
                if id(t) not in self._params:
                    self.set_dims(t, [None] * t.dim())
            if name in SHAPE_OPS:
                self.sym.record(self, name, args, kwargs, outs)
            return
        rule = self.rules.get(name)
        if rule is None:
            raise UnsupportedOpError(
                f"no coupling rule for {self.where(name)}: it ran on a tensor that carries prunable "
                f"channels. Register one with secateur.graph.register_rule({name!r}, rule), or protect "
                f"this module."
            )
        rule(OpContext(self, func, name, args, kwargs, out))
        if name in SHAPE_OPS:
            self.sym.record(self, name, args, kwargs, outs)

    # --- module hooks -------------------------------------------------------------------------------
    def pre_hook(self, path: str) -> Callable:
        def hook(mod: nn.Module, args: tuple, kwargs: dict, p: str | None = None) -> None:
            where = path if p is None else p
            self.stack.append(where)
            self.module_stack.append(mod)
            self.called.add(id(mod))
            if self.watch and where in self.watch:
                self.watched.setdefault(where, []).extend(self.live_dims())
                self._watch_open.append((where, len(self._watch_log)))
            if self.opaque == 0 and type(mod) in self.module_rules:
                self._opaque_args = (args, kwargs)
                self._opaque_mod = mod
            if self.opaque or type(mod) in self.module_rules:
                self.opaque += 1

        return hook

    def post_hook(self, path: str) -> Callable:
        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            if self.opaque:
                self.opaque -= 1
                if self.opaque == 0 and getattr(self, "_opaque_mod", None) is mod:
                    rule = self.module_rules[type(mod)]
                    ctx = OpContext(self, mod, type(mod).__name__, args, kwargs, out)
                    rule(ctx, mod, args, kwargs, out)
                    self._opaque_mod = None
            if self._watch_open and self._watch_open[-1][0] == self.stack[-1]:
                where, start = self._watch_open.pop()
                self.watched[where].extend(self._watch_log[start:])
                if not self._watch_open:
                    self._watch_log.clear()
            self.stack.pop()
            self.module_stack.pop()

        return hook


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    """``t.detach().to("meta")``: a meta tensor of the same shape, strides and dtype (directly for a dense
    plain tensor, which is cheaper than going through ``to``)."""
    if type(t) in (torch.Tensor, nn.Parameter) and (
        t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    return t.detach().to("meta")


def _to_meta(obj: Any, real: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Any:
    """Meta stand-ins for the tensors in ``obj``; ``real`` (if given) collects ``(stand-in, tensor)``."""
    if isinstance(obj, torch.Tensor):
        m = obj.to("meta")
        if real is not None:
            real.append((m, obj))
        return m
    if isinstance(obj, tuple):
        return tuple(_to_meta(o, real) for o in obj)
    if isinstance(obj, list):
        return [_to_meta(o, real) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_meta(v, real) for k, v in obj.items()}
    return obj


@dataclasses.dataclass
class ModelWalk:
    """One walk of a module tree (:func:`walk_model`).

    Attributes:
        params: ``model.named_parameters(remove_duplicate=False)`` as a dict (same names, same order).
        buffers: ``model.named_buffers(remove_duplicate=False)`` as a dict (same names, same order).
        by_path: every module under every path it is reachable by (``""``: the model).
        unique: ``list(model.named_modules())``: each module once, under its first path.
    """

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    by_path: dict[str, nn.Module]
    unique: list[tuple[str, nn.Module]]


def walk_model(model: nn.Module) -> ModelWalk:
    """Parameters, buffers and modules of ``model`` by qualified name, in one walk of the module tree (what
    ``named_parameters``, ``named_buffers`` and ``named_modules`` give, each of which walks the tree again).
    Reads only; see :class:`ModelWalk`."""
    params: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    by_path: dict[str, nn.Module] = {}
    first: dict[int, tuple[str, nn.Module]] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        pre = path + "." if path else ""
        for k, v in mod._parameters.items():
            if v is not None:
                params[pre + k] = v
        for k, v in mod._buffers.items():
            if v is not None:
                buffers[pre + k] = v
        by_path[path] = mod
        if id(mod) not in first:
            first[id(mod)] = (path, mod)
    return ModelWalk(params, buffers, by_path, list(first.values()))


def run_trace(
    model: nn.Module,
    example_inputs: Any,
    rules: dict[str, Rule],
    module_rules: dict[type, ModuleRule],
    device: str = "auto",
    watch: Sequence[str] = (),
) -> tuple[Tracer, Any]:
    """Trace ``model``; returns the tracer (atoms, param dims, splits) and the (meta or real) output.

    ``example_inputs``: one input (a tensor, a tuple of positional inputs or a dict of keyword inputs), or an
    :class:`~secateur.graph.ExampleInputs` of several: each is traced in turn into one atom store (so the
    couplings of all the traces merge) and the output is the tuple of their outputs.
    ``device``: ``"meta"`` runs on shape-only meta tensors (fast, computes nothing), ``"real"`` on the
    model's own tensors, ``"auto"`` tries meta and falls back to real if the model reads tensor values.
    ``watch``: module paths whose calls are recorded in ``tracer.watched`` (the dims of every tensor alive at
    their entry or made during them; used by ``untraced="freeze"``).

    Raises:
        InvalidModelError: ``model`` is not an ``nn.Module`` or has tensors on the meta device
            (:func:`secateur._validate.check_model`).
        ConfigError: an example input feeds an embedding an id outside its table (names input and layer).
        UnsupportedOpError: an op without a rule ran on a tensor carrying channels.
        GraphError: the forward itself fails.
    """
    if not isinstance(model, nn.Module):
        check_model(model)  # raises InvalidModelError naming the argument
    if device == "auto":
        try:
            return run_trace(model, example_inputs, rules, module_rules, "meta", watch)
        except SecateurError:
            raise
        except Exception:  # data-dependent Python code (item(), bool()) cannot run on meta tensors
            return run_trace(model, example_inputs, rules, module_rules, "real", watch)
    tracer = Tracer(model, rules, module_rules)
    tracer.watch = frozenset(watch)
    walk = walk_model(model)
    named, buffers, unique_modules = walk.params, walk.buffers, walk.unique
    if any(t.is_meta for t in named.values()) or any(t.is_meta for t in buffers.values()):
        check_model(model)  # a model on the meta device: InvalidModelError naming the first such tensor
    examples = as_examples(example_inputs)
    labels = [f"example_inputs[{i}]" for i in range(len(examples))]
    if len(examples) == 1:
        labels = ["example_inputs"]
    ints = {id(t): (t, label) for x, lab in zip(examples, labels) for t, label in integer_inputs(x, lab)}
    if device == "meta":
        cache: dict[int, torch.Tensor] = {}
        sub: dict[str, torch.Tensor] = {}
        for n, t in list(named.items()) + list(buffers.items()):
            if id(t) not in cache:
                cache[id(t)] = _meta_like(t)
            sub[n] = cache[id(t)]
        tracer.register_tensors(sub, set(buffers))
        tracer.meta = True
        real: list[tuple[torch.Tensor, torch.Tensor]] = []
        inputs = [_to_meta(x, real) for x in examples]
        for m, t in real:  # integer inputs: their values stay reachable from their meta stand-ins
            if id(t) in ints:
                tracer.real_ints[id(m)] = (m, t, ints[id(t)][1])
    else:
        sub = {**named, **buffers}
        tracer.register_tensors(sub, set(buffers))
        inputs = list(examples)
        tracer.real_ints = {k: (t, t, label) for k, (t, label) in ints.items()}
    tracer.named = sub
    handles = []
    attributes: AttributeTracing | None = None
    was_training = {m: m.training for _, m in unique_modules}
    try:
        # one global pair of hooks (cheap) names every module; modules with a module rule get their own
        # kwargs-aware hooks because the rule needs the call's arguments
        paths: dict[int, str] = {}
        for path, mod in unique_modules:
            tracer.modules.setdefault(path, mod)
            if type(mod) in module_rules:
                handles.append(mod.register_forward_pre_hook(tracer.pre_hook(path), with_kwargs=True))
                handles.append(mod.register_forward_hook(tracer.post_hook(path), with_kwargs=True))
            else:
                paths[id(mod)] = path
        pre, post = tracer.pre_hook(""), tracer.post_hook("")

        def gpre(mod: nn.Module, args: tuple) -> None:
            p = paths.get(id(mod))
            if p is not None:
                pre(mod, args, {}, p)

        def gpost(mod: nn.Module, args: tuple, out: Any) -> None:
            if id(mod) in paths:
                post(mod, args, {}, out)

        handles.append(nn.modules.module.register_module_forward_pre_hook(gpre))
        handles.append(nn.modules.module.register_module_forward_hook(gpost))
        # int attributes of modules carry their names into the sizes they compute (graph.symbolic)
        attributes = AttributeTracing(unique_modules, skip=tuple(module_rules))
        with torch.no_grad(), _Mode(tracer):
            if device == "meta":
                # the meta stand-ins go into every (module, attribute) slot directly (what
                # torch.func.functional_call does, without a get_submodule walk per name): one entry per
                # module object, so a module reachable under two paths (timm's CoaT reuses one Mlp as
                # mlp2/mlp3/mlp4) is swapped and restored once; tied tensors of distinct modules are all
                # swapped, so no tie_weights is needed
                swaps: list[tuple[dict, str, torch.Tensor]] = []
                for _, mod in unique_modules:
                    for store in (mod._parameters, mod._buffers):
                        for attr, t in store.items():
                            if t is not None and id(t) in cache:
                                swaps.append((store, attr, t))
                try:
                    for store, attr, t in swaps:
                        store[attr] = cache[id(t)]
                    outs = [call_model(model, x) for x in inputs]
                finally:
                    for store, attr, t in reversed(swaps):
                        store[attr] = t
            else:
                outs = [call_model(model, x) for x in inputs]
    except SecateurError:
        raise
    except Exception as e:
        if device == "meta":
            raise
        raise GraphError(f"forward pass failed while tracing at {tracer.where('?')}: {e!r}") from e
    finally:
        if attributes is not None:
            attributes.restore()
        for h in handles:
            h.remove()
        for m, tr in was_training.items():
            if m.training is not tr:
                m.training = tr
    tracer.sym.finalize(tracer)
    return tracer, outs[0] if len(outs) == 1 else tuple(outs)
