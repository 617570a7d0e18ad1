"""Layer-by-layer one-shot pruning of transformer stacks (magnitude, Wanda, SparseGPT).

Both SparseGPT (Frantar & Alistarh 2023, section 3 and its reference procedure) and Wanda (Sun et
al. 2023, section 3) prune a large model one block at a time, so that memory holds one block plus
the calibration activations entering it, never the activations of the whole model:

1. run the calibration batches through the model up to the first block and keep that block's
   inputs (hidden states and whatever else it is called with: attention mask, position embeddings);
2. for each block: run the held inputs through it with forward hooks on its Linear layers that
   accumulate input statistics (:class:`~secateur.llm.calibration.InputStats`), prune every
   Linear of the block from its statistics, then run the inputs through the *pruned* block again:
   those outputs are the next block's inputs, so later blocks see the errors of earlier ones.

The result is applied as element masks (:func:`secateur.masks.element.set_mask`); SparseGPT also
changes the surviving weights, which are written into the stored weight first.

Methods: ``magnitude``, ``wanda``, ``sparsegpt`` and ``ria`` (Zhang et al. 2024, the element criterion
:mod:`secateur.criteria.element.ria`). ``allocation`` chooses how much each unit loses (a unit is a block
for :func:`prune_oneshot`, a Linear for :func:`prune_linears`): ``"uniform"``, OWL's outlier-weighted
sparsities (:mod:`secateur.llm.owl`; its ratios come from a first, dense pass over the blocks, as in the
paper's reference procedure) or explicit per-unit fractions.

Blocks need not be called alike: :func:`prune_oneshot` records, in one cheap pass where every block's
``forward`` is a recorder (:func:`block_call_args`), the arguments the model hands each block, so Gemma 3's
sliding-window blocks are calibrated with their sliding mask and local rotary embeddings and its
full-attention blocks with theirs (before, every block reused the first block's arguments). Assumption:
each block returns its new hidden states (or a tuple whose first element they are), and a model's code
between blocks needs nothing but the hidden states (otherwise the recording falls back to the first
block's arguments for every block).
"""

from __future__ import annotations

import contextlib
import inspect
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from secateur._validate import check_sparsity
from secateur.compact import interrupts_deferred
from secateur.criteria.element.ria import ria_mask
from secateur.errors import ConfigError
from secateur.llm.calibration import InputStats
from secateur.llm.owl import OWL, layer_outlier_ratio, owl_sparsities
from secateur.llm.sparsegpt import sparsegpt_prune
from secateur.llm.wanda import wanda_mask
from secateur.masks.element import original, set_mask
from secateur.masks.patterns import Pattern, parse_pattern, pattern_mask

METHODS = ("magnitude", "wanda", "sparsegpt", "ria")

#: What ``allocation=`` accepts: "uniform", "owl", an :class:`~secateur.llm.owl.OWL`, or one fraction
#: per unit.
Allocation = str | OWL | Sequence[float]

# Where common transformer implementations keep their stack of blocks.
_BLOCK_PATHS = (
    "encoder.layer",
    "bert.encoder.layer",
    "roberta.encoder.layer",
    "transformer.h",
    "model.layers",
    "model.decoder.layers",
    "gpt_neox.layers",
    "layers",
    "h",
)


@dataclass
class LayerResult:
    """Outcome for one Linear: achieved ``sparsity`` (fraction) and optional relative error.

    ``rel_error = ||W X - W_hat X||_F^2 / ||W X||_F^2`` on the calibration tokens reaching the layer
    (only when ``track_error=True``); ``seconds`` is the time spent choosing the mask.
    """

    name: str
    shape: tuple[int, int]
    sparsity: float
    rel_error: float | None = None
    seconds: float = 0.0


@dataclass
class OneShotReport:
    """Summary of :func:`prune_oneshot`.

    ``peak_held_bytes``: the most bytes held at once for calibration (block inputs and extra call
    arguments plus the statistics of one block's Linears). ``full_capture_bytes``: the bytes that
    storing the inputs (real tokens only) of every pruned Linear of the whole model at once would
    take (what a non-layer-wise implementation holds); 0 when no statistics pass ran (magnitude
    without ``track_error``).

    ``allocation``: "uniform", "owl" or "given"; ``units``: the names of the allocation's units (blocks
    for :func:`prune_oneshot`, Linears for :func:`prune_linears`) and ``unit_sparsities`` the fraction
    each was asked to lose (empty for "uniform"); ``outlier_ratios``: OWL's ``D_l`` per unit (fractions;
    empty unless "owl").
    """

    method: str
    pattern: str
    sparsity: float
    n_tokens: int
    layers: list[LayerResult] = field(default_factory=list)
    peak_held_bytes: int = 0
    full_capture_bytes: int = 0
    seconds: float = 0.0
    allocation: str = "uniform"
    units: list[str] = field(default_factory=list)
    unit_sparsities: list[float] = field(default_factory=list)
    outlier_ratios: list[float] = field(default_factory=list)

    @property
    def overall_sparsity(self) -> float:
        """Fraction of zeros over all pruned Linear weights."""
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers)
        return zeros / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["overall_sparsity"] = self.overall_sparsity
        return d


class _StopForward(Exception):
    """Raised by the capture hook to stop the model right at the first block."""


def _get_path(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for part in path.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The ``(path, ModuleList)`` of transformer blocks, e.g. ``("encoder.layer", ...)`` for BERT.

    Tries ``path`` if given, otherwise the usual attribute paths of ``transformers`` models.

    Raises:
        ConfigError: ``path`` is not a non-empty ``nn.ModuleList``, or none of the usual paths is.
    """
    candidates = (path,) if path is not None else _BLOCK_PATHS
    for p in candidates:
        obj = _get_path(model, p)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return p, obj
    if path is not None:
        raise ConfigError(f"{type(model).__name__} has no non-empty ModuleList at {path!r}")
    raise ConfigError(
        f"cannot find the blocks of {type(model).__name__} (tried {', '.join(_BLOCK_PATHS)}); "
        "pass blocks='...'"
    )


def block_output(out: Any) -> torch.Tensor:
    """The hidden states a block returned: ``out`` itself, its first element, or its ``last_hidden_state``.

    Raises:
        ConfigError: none of those is a tensor.
    """
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    raise ConfigError(
        f"a block returned {type(out).__name__}; expected a tensor or a tuple starting with one"
    )


def _nbytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the tensors inside ``obj`` (tensors, tuples, lists, dicts), each storage counted once."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o, seen) for o in obj)
    if isinstance(obj, Mapping):
        return sum(_nbytes(o, seen) for o in obj.values())
    return 0


def _to(obj: Any, device: torch.device | None) -> Any:
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def is_linear_like(mod: nn.Module) -> bool:
    """True for ``nn.Linear`` and for GPT-2's ``Conv1D`` (a Linear whose weight is stored ``(in, out)``)."""
    if isinstance(mod, nn.Linear):
        return True
    w = getattr(mod, "weight", None)
    # The MRO, not the class name: a parametrized module's class is a generated subclass.
    is_conv1d = any(c.__name__ == "Conv1D" for c in type(mod).__mro__)
    return is_conv1d and hasattr(mod, "nf") and isinstance(w, torch.Tensor) and w.dim() == 2


def _out_in(mod: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a Linear-like module."""
    if isinstance(mod, nn.Linear):
        return mod.out_features, mod.in_features
    return mod.weight.shape[1], mod.weight.shape[0]


def _weight_out_in(mod: nn.Module) -> torch.Tensor:
    """The effective weight as ``(out, in)`` (a transposed view for ``Conv1D``)."""
    return mod.weight if isinstance(mod, nn.Linear) else mod.weight.T


def _included(name: str, mod: nn.Linear, include: str | Callable[[str, nn.Linear], bool] | None) -> bool:
    if include is None:
        return True
    return bool(re.search(include, name)) if isinstance(include, str) else bool(include(name, mod))


def select_linears(
    block: nn.Module, prefix: str, include: str | Callable[[str, nn.Linear], bool] | None
) -> list[tuple[str, nn.Linear]]:
    """``(qualified name, layer)`` of the linear-like layers of ``block`` that ``include`` selects (a name
    pattern, a predicate ``f(name, layer)``, or None for all); names are prefixed with ``prefix``."""
    out = []
    for name, mod in block.named_modules():
        if not is_linear_like(mod):
            continue
        full = f"{prefix}.{name}"
        if _included(full, mod, include):
            out.append((full, mod))
    return out


def _capture_first_block_inputs(
    model: nn.Module, first: nn.Module, batches: list[Mapping[str, torch.Tensor]]
) -> list[tuple[torch.Tensor, tuple, dict]]:
    """Run each batch up to ``first`` and return its ``(hidden, other_args, kwargs)``."""
    store: list[tuple[torch.Tensor, tuple, dict]] = []

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        if args:
            hidden, rest = args[0], tuple(args[1:])
        elif "hidden_states" in kwargs:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        else:
            raise ConfigError("the first block was called without hidden states")
        for v in (*rest, *kwargs.values()):
            if "Cache" in type(v).__name__:
                # A key/value cache would grow at every block call and leak across passes.
                raise ConfigError(f"the first block received a {type(v).__name__}; call with use_cache=False")
        store.append((hidden.detach(), rest, dict(kwargs)))
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    accepts_cache = "use_cache" in inspect.signature(model.forward).parameters
    try:
        for batch in batches:
            call = dict(batch)
            if accepts_cache and "use_cache" not in call:
                call["use_cache"] = False  # decoders: no key/value cache during calibration
            try:
                model(**call)
            except _StopForward:
                pass
            else:
                raise ConfigError("the model finished its forward pass without calling the first block")
    finally:
        handle.remove()
    return store


def _token_mask(batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    m = batch.get("attention_mask")
    return None if m is None else m.bool()


def check_oneshot_args(
    linears: list[tuple[str, nn.Linear]], method: str, p: Pattern, sparsity: float | None
) -> float:
    """Validate a one-shot call before anything changes; returns the sparsity (a fraction) to apply.

    Raises:
        ConfigError: an unknown method, a pattern the method does not support, a sparsity that disagrees
            with an N:M pattern, or no layer selected.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown one-shot method {method!r}; available: {list(METHODS)}")
    if p.kind == "block" and method == "sparsegpt":
        raise ConfigError("SparseGPT supports unstructured and N:M patterns, not blocks")
    if p.kind == "nm":
        n, m = p.nm
        for name, mod in linears:
            if _out_in(mod)[1] % m:
                raise ConfigError(
                    f"{name}: in_features ({_out_in(mod)[1]}) is not divisible by M={m} for {n}:{m} sparsity"
                )
        return 1.0 - n / m
    if sparsity is None:
        raise ConfigError(f"pattern {p} needs a sparsity (fraction in [0, 1))")
    sp = check_sparsity(sparsity)
    if p.kind == "block":
        k, l = p.block
        for name, mod in linears:
            out_f, in_f = _out_in(mod)
            if out_f % k or in_f % l:
                raise ConfigError(f"{name}: shape ({out_f}, {in_f}) is not divisible by block {k}x{l}")
    return sp


def check_allocation(allocation: Allocation, p: Pattern, units: Sequence[str]) -> OWL | list[float] | None:
    """Validate ``allocation`` before anything changes: None for ``"uniform"``, the :class:`OWL` to apply
    (``"owl"``: the paper's ``M = 5``, ``lambda = 0.08``), or the list of per-unit fractions.

    ``units`` names the allocation's units in order (blocks for :func:`prune_oneshot`, Linears for
    :func:`prune_linears`); an explicit allocation gives one fraction in [0, 1) per unit.

    Raises:
        ConfigError: an unknown name, a non-uniform allocation with an N:M pattern (N:M fixes every layer's
            sparsity at ``1 - N/M``; OWL is defined for unstructured sparsity), a sequence of the wrong length
            or a fraction outside [0, 1) (naming the unit).
    """
    if isinstance(allocation, str):
        if allocation == "uniform":
            return None
        if allocation != "owl":
            raise ConfigError(f"unknown one-shot allocation {allocation!r}; use 'uniform', 'owl', OWL(...) "
                              "or one sparsity per unit")
        allocation = OWL()
    if p.kind == "nm":
        raise ConfigError(
            f"allocation {allocation!r} gives layers different sparsities, which the {p} pattern cannot "
            "express (every layer of an N:M model has sparsity 1 - N/M, the format sparse kernels run); OWL "
            "is defined for unstructured sparsity: use pattern='row', 'layer' or a block pattern, or "
            "allocation='uniform'"
        )
    if isinstance(allocation, OWL):
        return allocation
    if hasattr(allocation, "__iter__") and not isinstance(allocation, (str, bytes, Mapping)):
        try:
            values = [float(v) for v in allocation]
        except (TypeError, ValueError):
            raise ConfigError(f"allocation must hold one number per unit, got {allocation!r}") from None
        if len(values) != len(units):
            raise ConfigError(
                f"allocation gives {len(values)} sparsities for {len(units)} units "
                f"({', '.join(units[:4])}{' ...' if len(units) > 4 else ''})"
            )
        return [check_sparsity(v, f"sparsity of {u}") for v, u in zip(values, units)]
    raise ConfigError(f"allocation must be 'uniform', 'owl', an OWL or a sequence of fractions, got "
                      f"{type(allocation).__name__}")


@torch.no_grad()
def prune_linear(
    module: nn.Linear,
    method: str,
    stats: InputStats | None,
    sparsity: float | None,
    pattern: str | tuple[int, int] | Pattern = "row",
    name: str = "",
    block_size: int = 128,
    damp: float = 0.01,
    as_masks: bool = True,
) -> torch.Tensor:
    """Prune one Linear from its input statistics and apply the result; returns the keep-mask ``(out, in)``.

    ``magnitude``: scores ``|W|`` (Han et al. 2015) under ``pattern`` ("row" compares within each
    output row, "layer" over the matrix, "N:M", "blockKxL"). ``wanda``: ``|W| * ||X_j||_2`` (Sun et
    al. 2023, eq. 1). ``ria``: ``RI_ij * ||X_j||_2^0.5`` (Zhang et al. 2024, eq. 2; the paper compares
    over the layer: ``pattern="layer"``). ``sparsegpt``: OBS reconstruction (Frantar & Alistarh 2023,
    Algorithm 1), which writes the updated surviving weights. With ``as_masks`` the pattern is recorded as an
    element mask (:func:`~secateur.masks.element.set_mask`); otherwise zeros are written in place.
    GPT-2's ``Conv1D`` (weight stored ``(in, out)``) is handled as its transposed Linear.

    Raises:
        ConfigError: an unknown method, a missing statistic, or a bad sparsity/pattern.
    """
    transposed = not isinstance(module, nn.Linear)
    w = _weight_out_in(module).detach()
    new_w = None
    if method == "magnitude":
        keep = pattern_mask(w.abs(), pattern, sparsity, name)
    elif method == "wanda":
        if stats is None:
            raise ConfigError(f"{name}: Wanda needs input statistics")
        keep = wanda_mask(w, stats.column_norms(), sparsity, pattern, name)
    elif method == "ria":
        if stats is None:
            raise ConfigError(f"{name}: RIA needs input statistics")
        keep = ria_mask(w, stats.sq_sum.sqrt(), sparsity, pattern, layer=name)
    elif method == "sparsegpt":
        if stats is None or stats.xtx is None:
            raise ConfigError(f"{name}: SparseGPT needs the input Hessian")
        new_w, keep = sparsegpt_prune(w, stats.hessian(), sparsity, pattern, block_size, damp, name)
    else:
        raise ConfigError(f"unknown one-shot method {method!r}; available: {list(METHODS)}")
    stored_keep = keep.T if transposed else keep
    if new_w is not None:
        original(module, "weight").copy_(new_w.T if transposed else new_w)
    if as_masks:
        set_mask(module, stored_keep)
    else:
        original(module, "weight").mul_(stored_keep.to(w.device))
    return keep


def _rel_error(w_old: torch.Tensor, w_new: torch.Tensor, xtx: torch.Tensor) -> float:
    """``||(W - W_hat) X||^2 / ||W X||^2`` from ``X X^T`` (no need to keep ``X``)."""
    g = xtx.double()
    w0 = w_old.double().to(g.device)
    d = w0 - w_new.double().to(g.device)
    num = ((d @ g) * d).sum()
    den = ((w0 @ g) * w0).sum()
    return (num / den).item() if den > 0 else 0.0


@torch.no_grad()
def prune_oneshot(
    model: nn.Module,
    data: Iterable[Mapping[str, torch.Tensor]],
    method: str = "wanda",
    sparsity: float | None = 0.5,
    pattern: str | tuple[int, int] | Pattern = "row",
    *,
    blocks: str | None = None,
    include: str | Callable[[str, nn.Linear], bool] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    device: torch.device | str | None = None,
    track_error: bool = False,
    as_masks: bool = True,
    allocation: Allocation = "uniform",
) -> OneShotReport:
    """Prune every Linear (and GPT-2 ``Conv1D``) inside the model's transformer blocks, block by block.

    Args:
        model: e.g. a ``transformers`` BERT/GPT-2/LLaMA model; put in eval mode for the call.
        data: the calibration batches, each the keyword arguments of ``model(**batch)`` (from
            :func:`~secateur.llm.calibration.tokenized_batches`); ``attention_mask`` marks the
            real tokens, the only ones counted in the statistics.
        method: ``"magnitude"``, ``"wanda"``, ``"sparsegpt"`` or ``"ria"`` (Zhang et al. 2024, exponent
            0.5; the paper compares scores over the layer: pass ``pattern="layer"`` for its choice).
        sparsity: fraction in [0, 1) for unstructured/block patterns (ignored for N:M); with a
            non-uniform ``allocation``, the mean over the blocks.
        pattern: ``"row"`` (per output row; default, Wanda's choice), ``"layer"``, ``"N:M"`` or
            ``(N, M)``, ``"blockKxL"`` (not with SparseGPT). For SparseGPT "row"/"layer" both mean
            its adaptive per-column-block selection with an exact per-layer count.
        blocks: attribute path of the ModuleList of blocks (found automatically if None).
        include: regex on full Linear names (``"encoder.layer.0.attention.self.query"``) or a
            predicate ``(name, module) -> bool``; None prunes every Linear in the blocks.
        block_size, damp: SparseGPT's column block (128) and dampening (1% of mean diag H).
        device: run each block there (it is moved back afterwards); None keeps devices as they are.
        track_error: also record each layer's relative reconstruction error (costs ``in^2``
            statistics per Linear for every method).
        as_masks: record the pattern as element masks (default) or write zeros into the weights.
        allocation: how much each block loses: ``"uniform"`` (``sparsity`` everywhere), ``"owl"`` or
            ``OWL(m, lam)`` (Yin et al. 2024: blocks with more outlier Wanda scores pruned less, mean
            ``sparsity``, weighted by the blocks' numbers of selected weights; the outlier ratios come from
            a first pass over the *dense* blocks, which costs one more forward pass of the calibration
            data), or one fraction per block holding selected Linears. Not with N:M patterns.

    Returns:
        :class:`OneShotReport` with per-layer achieved sparsity and memory accounting (and, for a
        non-uniform allocation, each block's target sparsity and OWL outlier ratio).

    Raises:
        ConfigError: unknown method, bad sparsity or pattern, in_features not divisible by M (naming
            the layer), no blocks or no Linear selected, empty batches, a bad allocation (an N:M pattern
            with OWL, a wrong number of fractions) or an OWL block sparsity outside [0, 1). All checks run
            before any weight changes, so on error the model is untouched.

    Transactional: any failure later, or a ``KeyboardInterrupt`` / ``SystemExit`` at any point, restores
    every selected Linear's stored weight and mask (or its absence) bit-identical from a CPU snapshot
    (one copy of the selected weights), moves the block being pruned back to its device, and re-raises.
    """
    t0 = time.perf_counter()
    p = parse_pattern(pattern)
    block_path, block_list = find_blocks(model, blocks)
    per_block = [select_linears(b, f"{block_path}.{i}", include) for i, b in enumerate(block_list)]
    all_linears = [x for lin in per_block for x in lin]
    if not all_linears:
        raise ConfigError(f"no Linear selected inside {block_path} (include={include!r})")
    sp = check_oneshot_args(all_linears, method, p, sparsity)
    units = [f"{block_path}.{i}" for i, lin in enumerate(per_block) if lin]
    alloc = check_allocation(allocation, p, units)
    batches = list(data)
    if not batches:
        raise ConfigError("no calibration batches given")
    dev = torch.device(device) if device is not None else None

    was_training = model.training
    model.eval()
    # Transactional: a failure midway (e.g. a Hessian that stays indefinite) must not leave the
    # model half-pruned. The snapshot lives on the CPU and costs one copy of the pruned weights.
    snapshot = _snapshot_linears(all_linears)
    try:
        inputs, masks, n_tokens, block_args = calibration_stack_inputs(model, block_list, batches, dev)
        report = OneShotReport(method=method, pattern=str(p), sparsity=sp, n_tokens=n_tokens)
        block_sp = _block_sparsities(
            alloc, sp, block_list, per_block, inputs, masks, dev, units, report, block_args
        )
        last = max(i for i, lin in enumerate(per_block) if lin)
        for bi, block in enumerate(block_list[: last + 1]):
            # The pruned block's outputs are the next block's inputs (errors propagate forward);
            # past the last block with selected Linears there is nothing left to feed.
            inputs = prune_block(
                block,
                per_block[bi],
                with_block_args(inputs, block_args, bi),
                masks,
                method,
                block_sp[bi],
                p,
                report,
                block_size=block_size,
                damp=damp,
                device=dev,
                track_error=track_error,
                as_masks=as_masks,
                feed_next=bi < last,
            )
    except BaseException:  # an error or an interrupt (Ctrl-C): the weights and masks as they were
        with interrupts_deferred():
            _restore_linears(all_linears, snapshot)
        raise
    finally:
        model.train(was_training)
    report.seconds = time.perf_counter() - t0
    return report



def _block_sparsities(
    alloc: OWL | list[float] | None,
    sp: float,
    block_list: nn.ModuleList,
    per_block: list[list[tuple[str, nn.Module]]],
    inputs: BlockInputs,
    masks: list[torch.Tensor | None],
    device: torch.device | None,
    units: list[str],
    report: OneShotReport,
    block_args: BlockArgs | None = None,
) -> list[float]:
    """The sparsity of each block of the stack under ``alloc`` (blocks without selected Linears get ``sp``,
    unused); records the allocation in ``report``. OWL runs its dense pass here (nothing changes)."""
    if alloc is None:
        return [sp] * len(block_list)
    if isinstance(alloc, OWL):
        ratios = owl_block_ratios(block_list, per_block, inputs, masks, alloc.m, device, block_args)
        sizes = [sum(_out_in(m)[0] * _out_in(m)[1] for _, m in lin) for lin in per_block if lin]
        given = owl_sparsities(ratios, sp, alloc.lam, sizes, units)
        report.allocation, report.outlier_ratios = "owl", ratios
    else:
        given = list(alloc)
        report.allocation = "given"
    report.units, report.unit_sparsities = list(units), given
    it = iter(given)
    return [next(it) if lin else sp for lin in per_block]


@torch.no_grad()
def prune_linears(
    model: nn.Module,
    data: Any,
    method: str = "wanda",
    sparsity: float | None = 0.5,
    pattern: str | tuple[int, int] | Pattern = "row",
    *,
    scope: Any = None,
    block_size: int = 128,
    damp: float = 0.01,
    track_error: bool = False,
    as_masks: bool = True,
    allocation: Allocation = "uniform",
) -> OneShotReport:
    """Prune any model's Linear layers in one shot from one calibration pass (magnitude, Wanda, SparseGPT,
    RIA).

    The general entry point beside :func:`prune_oneshot`, for models that are not a stack of transformer
    blocks called with hidden states (a vision transformer, an MLP, a CNN's classifier): the whole model is
    one :func:`prune_block`. Each calibration batch runs once through the *dense* model while hooks
    accumulate every selected Linear's input statistics (:class:`~secateur.llm.calibration.InputStats`),
    then each Linear is pruned from its own statistics by :func:`prune_linear` (Wanda: ``|W| * ||X_j||_2``,
    Sun et al. 2023, eq. 1, the paper also prunes the linear layers of ViT/ConvNeXt image classifiers;
    SparseGPT: Frantar & Alistarh 2023, Algorithm 1). Unlike :func:`prune_oneshot` the pruning error of one
    layer does not reach the statistics of the next, and the statistics of all selected Linears are held
    at once (``in`` floats each for Wanda, ``in x in`` for SparseGPT or ``track_error``).

    Args:
        model: any ``nn.Module``; put in eval mode for the call.
        data: one batch or an iterable of batches: a tensor (the input), a pair ``(input, target)`` (the
            target is ignored), or a mapping of keyword arguments whose first entry named like
            ``model.forward``'s first parameter is the input (its ``attention_mask`` marks real tokens).
        method, sparsity, pattern, block_size, damp, track_error, as_masks: as :func:`prune_oneshot`
            (``pattern="2:4"`` or ``(2, 4)`` for N:M, which implies the sparsity).
        scope: a :class:`secateur.scope.Scope` selecting the Linears (every selected module must be
            Linear-like); None selects every Linear (and GPT-2 ``Conv1D``) of the model.
        allocation: ``"uniform"``, ``"owl"`` / ``OWL(m, lam)`` (each selected Linear is one OWL layer: its
            outlier ratio from its own Wanda scores, the mean sparsity weighted by the Linears' sizes), or
            one fraction per selected Linear (in the order of ``model.named_modules()``). Not with N:M.

    Returns:
        :class:`OneShotReport`; ``n_tokens`` counts calibration examples (rows of the input batches).

    Raises:
        ConfigError: an unknown method, a bad sparsity or pattern, in_features not divisible by M (naming
            the layer), a scope that selects a module that is not Linear (named), no Linear, no batch, or a
            batch of another form. All checks run before any weight changes; any failure or interrupt later
            restores every selected Linear bit-identical (as :func:`prune_oneshot`).
    """
    t0 = time.perf_counter()
    p = parse_pattern(pattern)
    linears = _scoped_linears(model, scope)
    sp = check_oneshot_args(linears, method, p, sparsity)
    alloc = check_allocation(allocation, p, [n for n, _ in linears])
    inputs, masks = _model_inputs(model, data)
    was_training = model.training
    model.eval()
    snapshot = _snapshot_linears(linears)
    try:
        n_examples = sum(int(h.shape[0]) if h.dim() else 1 for h, _, _ in inputs)
        report = OneShotReport(method=method, pattern=str(p), sparsity=sp, n_tokens=n_examples)
        per: float | dict[str, float] = sp
        if isinstance(alloc, list):
            per = dict(zip([n for n, _ in linears], alloc))
            report.allocation, report.units, report.unit_sparsities = "given", list(per), alloc
        elif alloc is not None:
            report.allocation = "owl"
        prune_block(
            model, linears, inputs, masks, method, per, p, report, block_size=block_size, damp=damp,
            track_error=track_error, as_masks=as_masks, feed_next=False,
            owl=alloc if isinstance(alloc, OWL) else None,
        )
    except BaseException:  # an error or an interrupt (Ctrl-C): the weights and masks as they were
        with interrupts_deferred():
            _restore_linears(linears, snapshot)
        raise
    finally:
        model.train(was_training)
    report.seconds = time.perf_counter() - t0
    return report


def _scoped_linears(model: nn.Module, scope: Any) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the Linears ``scope`` selects (every Linear-like module when None)."""
    if scope is None:
        linears = [(n, m) for n, m in model.named_modules() if n and is_linear_like(m)]
        if not linears:
            raise ConfigError(f"{type(model).__name__} has no Linear layer to prune")
        return linears
    targets = scope.resolve(model)
    other = [f"{t.path} ({type(t.module).__name__})" for t in targets if not is_linear_like(t.module)]
    if other:
        raise ConfigError(
            f"one-shot Linear pruning scores Linear layers from their input features; the scope also selects "
            f"{', '.join(other[:3])}{' ...' if len(other) > 3 else ''}: restrict the scope's types to Linear"
        )
    return [(t.path, t.module) for t in targets]


def _model_inputs(model: nn.Module, data: Any) -> tuple[BlockInputs, list[torch.Tensor | None]]:
    """``data`` as :func:`prune_block` inputs of the whole model: ``[(input, (), kwargs)]`` and token masks.

    Raises:
        ConfigError: no batch, or a batch that is not a tensor, an ``(input, target)`` pair or a mapping
            holding ``model.forward``'s first parameter.
    """
    from secateur.criteria.element.saliency import is_single_batch

    batches = [data] if is_single_batch(data) else list(data if data is not None else [])
    if not batches:
        raise ConfigError("no calibration batches given (data=None or empty)")
    first = next(iter(inspect.signature(model.forward).parameters), None)
    inputs: BlockInputs = []
    masks: list[torch.Tensor | None] = []
    for i, b in enumerate(batches):
        if isinstance(b, torch.Tensor):
            inputs.append((b, (), {}))
            masks.append(None)
        elif isinstance(b, (tuple, list)) and b and isinstance(b[0], torch.Tensor):
            inputs.append((b[0], (), {}))
            masks.append(None)
        elif isinstance(b, Mapping) and first in b:
            kw = {k: v for k, v in b.items() if k != first}
            inputs.append((b[first], (), kw))
            masks.append(_token_mask(b))
        else:
            raise ConfigError(
                f"calibration batch {i} is a {type(b).__name__}; expected a tensor, an (input, target) pair "
                f"or a mapping with {first!r} (the first argument of {type(model).__name__}.forward)"
            )
    return inputs, masks

BlockInputs = list[tuple[torch.Tensor, tuple, dict]]


@torch.no_grad()
def calibration_inputs(
    model: nn.Module,
    first_block: nn.Module,
    data: list[Mapping[str, torch.Tensor]],
    device: torch.device | None = None,
) -> tuple[BlockInputs, list[torch.Tensor | None], int]:
    """Inputs of ``first_block`` for each calibration batch, the batches' token masks and real-token count.

    ``data`` is the calibration batches, each the keyword arguments of ``model(**batch)``.

    Each batch runs through ``model`` until ``first_block`` is called (a forward pre-hook stores its
    arguments and stops the pass), so only the layers before the first block need weights.
    Returns ``(inputs, masks, n_tokens)``: ``inputs[i] = (hidden (batch, seq, width), other_args,
    kwargs)``; ``masks[i]`` the bool ``(batch, seq)`` attention mask (None if the batch has none);
    ``n_tokens`` the number of real tokens. Tensors are moved to ``device`` when given.

    Raises:
        ConfigError: the block is called without hidden states or with a key/value cache, or the
            model finishes its pass without calling it.
    """
    inputs = _capture_first_block_inputs(model, first_block, data)
    masks = [_token_mask(b) for b in data]
    inputs = [(_to(h, device), _to(r, device), _to(k, device)) for h, r, k in inputs]
    masks = [_to(m, device) for m in masks]
    n_tokens = sum(
        int(m.sum().item()) if m is not None else h.shape[0] * h.shape[1]
        for m, (h, _, _) in zip(masks, inputs)
    )
    return inputs, masks, n_tokens


#: Per block, per calibration batch: the positional arguments after the hidden states, and the keywords.
BlockArgs = list[list[tuple[tuple, dict]]]


class _Recorder:
    """Stands in for a block's ``forward`` during :func:`block_call_args`: records the call, returns the
    hidden states unchanged (the block's weights are never used) and stops the pass at the last block."""

    def __init__(self, index: int, last: int, first: list, args: BlockArgs) -> None:
        self.index, self.last, self.first, self.args = index, last, first, args

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            hidden, rest = args[0], tuple(args[1:])
        elif "hidden_states" in kwargs:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        else:
            raise ConfigError(f"block {self.index} was called without hidden states")
        for v in (*rest, *kwargs.values()):
            if "Cache" in type(v).__name__:
                raise ConfigError(
                    f"block {self.index} received a {type(v).__name__}; call with use_cache=False"
                )
        self.args[self.index].append((rest, dict(kwargs)))
        if self.index == 0:
            self.first.append(hidden.detach())
        if self.index == self.last:
            raise _StopForward
        return hidden


_NO_FORWARD = object()


@torch.no_grad()
def block_call_args(
    model: nn.Module, block_list: Sequence[nn.Module], data: list[Mapping[str, torch.Tensor]]
) -> tuple[list[torch.Tensor], BlockArgs]:
    """The first block's hidden states and *every* block's other call arguments, per calibration batch.

    ``data`` is the calibration batches, each the keyword arguments of ``model(**batch)``.

    Blocks need not be called alike: Gemma 2/3 pass sliding-window blocks another attention mask and other
    rotary embeddings than full-attention blocks (chosen by ``config.layer_types``). One pass of the model
    with each block's ``forward`` replaced by a recorder (it returns its hidden states unchanged, so no
    block computes, and it stops the pass at the last block: nothing after the blocks runs) records what
    the model hands each block. Returns ``(hidden, args)``: ``hidden[b]`` the ``(batch, seq, width)``
    input of the first block for batch ``b``; ``args[i][b] = (other positional args, kwargs)`` of block
    ``i``. The blocks' ``forward`` are restored on any exit.

    Raises:
        ConfigError: a block called without hidden states or with a key/value cache, or a pass that ends
            without reaching the last block. Any other exception of the model is re-raised.
    """
    first: list[torch.Tensor] = []
    args: BlockArgs = [[] for _ in block_list]
    saved = [b.__dict__.get("forward", _NO_FORWARD) for b in block_list]
    accepts_cache = "use_cache" in inspect.signature(model.forward).parameters
    try:
        for i, b in enumerate(block_list):
            b.forward = _Recorder(i, len(block_list) - 1, first, args)
        for batch in data:
            call = dict(batch)
            if accepts_cache and "use_cache" not in call:
                call["use_cache"] = False
            try:
                model(**call)
            except _StopForward:
                pass
            else:
                raise ConfigError("the model finished its forward pass without calling its last block")
    finally:
        for b, f in zip(block_list, saved):
            if f is _NO_FORWARD:
                b.__dict__.pop("forward", None)
            else:
                b.forward = f
    return first, args


def _same_args(a: tuple[tuple, dict], b: tuple[tuple, dict]) -> bool:
    """Whether two recorded calls pass the same objects (or equal non-tensor values)."""

    def same(x: Any, y: Any) -> bool:
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return x is y
        if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
            return len(x) == len(y) and all(same(u, v) for u, v in zip(x, y))
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        try:
            return bool(x == y)
        except Exception:  # noqa: BLE001 - objects without a usable ==
            return x is y

    return same(a[0], b[0]) and same(a[1], b[1])


@torch.no_grad()
def calibration_stack_inputs(
    model: nn.Module,
    block_list: Sequence[nn.Module],
    data: list[Mapping[str, torch.Tensor]],
    device: torch.device | None = None,
) -> tuple[BlockInputs, list[torch.Tensor | None], int, BlockArgs | None]:
    """:func:`calibration_inputs` of the first block plus each block's own call arguments.

    ``data`` is the calibration batches, each the keyword arguments of ``model(**batch)``.

    Returns ``(inputs, masks, n_tokens, block_args)``; ``block_args`` is None when every block is called
    with the first block's arguments (the usual case: BERT, GPT-2, Llama), else ``block_args[i][b]`` is
    block ``i``'s ``(other args, kwargs)`` for batch ``b`` (Gemma 3: sliding / full attention), moved to
    ``device``. If the recording pass fails (a model whose code needs its blocks' real outputs between
    blocks), every block gets the first block's arguments, as :func:`calibration_inputs`.

    Raises:
        ConfigError: as :func:`calibration_inputs`.
    """
    try:
        first, args = block_call_args(model, block_list, data)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - fall back to the first block's arguments for every block
        inputs, masks, n_tokens = calibration_inputs(model, block_list[0], data, device)
        return inputs, masks, n_tokens, None
    masks = [_to(_token_mask(b), device) for b in data]
    memo: dict[int, Any] = {}
    inputs = [(_to(h, device), _to_shared(r, device, memo), _to_shared(k, device, memo))
              for h, (r, k) in zip(first, args[0])]
    n_tokens = sum(
        int(m.sum().item()) if m is not None else h.shape[0] * h.shape[1]
        for m, (h, _, _) in zip(masks, inputs)
    )
    if all(_same_args(args[i][b], args[0][b]) for i in range(1, len(args)) for b in range(len(data))):
        return inputs, masks, n_tokens, None
    moved = [[(_to_shared(r, device, memo), _to_shared(k, device, memo)) for r, k in per] for per in args]
    return inputs, masks, n_tokens, moved


def _to_shared(obj: Any, device: torch.device | None, memo: dict[int, Any]) -> Any:
    """:func:`_to` that moves each tensor once (blocks of one kind share their mask and rotary tensors)."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, tuple):
        return tuple(_to_shared(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_to_shared(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_shared(v, device, memo) for k, v in obj.items()}
    return obj


def with_block_args(inputs: BlockInputs, block_args: BlockArgs | None, index: int) -> BlockInputs:
    """``inputs`` with block ``index``'s own call arguments (unchanged when ``block_args`` is None)."""
    if block_args is None:
        return inputs
    return [(h, r, k) for (h, _, _), (r, k) in zip(inputs, block_args[index])]


@contextlib.contextmanager
def _on_device(block: nn.Module, device: torch.device | None) -> Iterator[None]:
    """Run the body with ``block`` on ``device`` (None: where it is), moving it back on any exit."""
    if device is None:
        yield
        return
    home = next(block.parameters()).device
    block.to(device)
    try:
        yield
    finally:
        block.to(home)


def collect_block_stats(
    block: nn.Module,
    linears: list[tuple[str, nn.Module]],
    inputs: BlockInputs,
    masks: list[torch.Tensor | None],
    *,
    hessian: bool = False,
    report: OneShotReport | None = None,
    keep_outputs: bool = False,
) -> tuple[dict[str, InputStats], BlockInputs | None]:
    """Run ``inputs`` through ``block`` once with hooks accumulating each Linear's :class:`InputStats`.

    Real tokens only (``masks[i]``: bool ``(batch, seq)`` or None). Returns ``({name: stats}, outputs)``:
    ``outputs`` is the block's outputs as next-block inputs (same form as ``inputs``) when
    ``keep_outputs``, else None. With ``report``, ``report.full_capture_bytes`` grows by the bytes of the
    inputs the hooks saw (what storing them would cost).

    Raises:
        ConfigError: a block output that is not a tensor or a tuple starting with one (``keep_outputs``).
    """
    stats: dict[str, InputStats] = {}
    current: dict[str, torch.Tensor | None] = {"mask": None}
    handles = []
    for name, mod in linears:
        stats[name] = InputStats(_out_in(mod)[1], hessian=hessian, device=mod.weight.device)

        def hook(
            _m: nn.Module, inp: tuple, _out: Any, _s: InputStats = stats[name], _c: dict = current
        ) -> None:
            x, tm = inp[0], _c["mask"]
            if report is not None:
                real = x.numel() // x.shape[-1]
                if tm is not None and tuple(tm.shape) == tuple(x.shape[:-1]):
                    real = int(tm.sum())
                report.full_capture_bytes += real * x.shape[-1] * x.element_size()
            _s.add(x, tm)

        handles.append(mod.register_forward_hook(hook))
    outputs: BlockInputs | None = [] if keep_outputs else None
    try:
        for (h, rest, kw), m in zip(inputs, masks):
            current["mask"] = m
            out = block(h, *rest, **kw)
            if outputs is not None:
                outputs.append((block_output(out).detach(), rest, kw))
    finally:
        for hd in handles:
            hd.remove()
    return stats, outputs


def _owl_linear_sparsities(
    linears: list[tuple[str, nn.Module]], stats: dict[str, InputStats], sparsity: float, owl: OWL,
    report: OneShotReport,
) -> dict[str, float]:
    """OWL over the Linears of one block (each Linear a unit); records units, ratios and sparsities."""
    names = [n for n, _ in linears]
    ratios = [layer_outlier_ratio([_weight_out_in(m)], [stats[n].sq_sum.sqrt()], owl.m) for n, m in linears]
    sizes = [_out_in(m)[0] * _out_in(m)[1] for _, m in linears]
    per = owl_sparsities(ratios, sparsity, owl.lam, sizes, names)
    report.units, report.outlier_ratios, report.unit_sparsities = names, ratios, per
    return dict(zip(names, per))


@torch.no_grad()
def prune_block(
    block: nn.Module,
    linears: list[tuple[str, nn.Module]],
    inputs: BlockInputs,
    masks: list[torch.Tensor | None],
    method: str,
    sparsity: float | Mapping[str, float],
    pattern: Pattern,
    report: OneShotReport,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    device: torch.device | None = None,
    track_error: bool = False,
    as_masks: bool = True,
    feed_next: bool = True,
    owl: OWL | None = None,
) -> BlockInputs:
    """Prune the ``linears`` of one block from its calibration ``inputs``; return the next block's inputs.

    One step of :func:`prune_oneshot` (and of :func:`secateur.llm.offload.prune_checkpoint`): run
    ``inputs`` through ``block`` with hooks accumulating :class:`InputStats` of each Linear
    (real tokens only, from ``masks``), prune every Linear with :func:`prune_linear`, append a
    :class:`LayerResult` per Linear to ``report`` and raise ``report.peak_held_bytes`` to the bytes
    held (inputs plus statistics). If ``feed_next``, the inputs then run through the *pruned* block
    and its outputs (same shapes as the hidden states) are returned; otherwise ``inputs`` is
    returned as is. ``device``: the block runs there and is moved back to where it was.
    ``sparsity`` is the validated fraction (or ``{linear name: fraction}``) and ``pattern`` the parsed
    pattern. ``owl``: allocate ``sparsity`` among the Linears by OWL (each Linear a unit, its outlier ratio
    from the statistics just gathered; :func:`prune_linears`), recorded in ``report``.

    Raises:
        ConfigError: as :func:`prune_linear`, a block output that is not a tensor or a tuple starting with
            one, or (``owl``) a Linear whose OWL sparsity falls outside [0, 1) (before any Linear changes).
    """
    need_stats = method != "magnitude" or track_error or owl is not None
    need_h = method == "sparsegpt" or track_error
    with _on_device(block, device):  # moved back on any exit, an interrupt included
        held = _nbytes(inputs)
        stats: dict[str, InputStats] = {}
        if linears and need_stats:
            stats, _ = collect_block_stats(block, linears, inputs, masks, hessian=need_h, report=report)
            held += sum(s.nbytes for s in stats.values())
        report.peak_held_bytes = max(report.peak_held_bytes, held)
        if owl is not None and linears and not isinstance(sparsity, Mapping):
            sparsity = _owl_linear_sparsities(linears, stats, sparsity, owl, report)

        for name, mod in linears:
            t1 = time.perf_counter()
            w_old = _weight_out_in(mod).detach().clone() if track_error else None
            sp = sparsity[name] if isinstance(sparsity, Mapping) else sparsity
            # Looked up in the module at call time so that tests can inject a failure.
            keep = prune_linear(mod, method, stats.get(name), sp, pattern, name, block_size, damp, as_masks)
            res = LayerResult(
                name=name,
                shape=_out_in(mod),
                sparsity=1.0 - keep.float().mean().item(),
                seconds=time.perf_counter() - t1,
            )
            if track_error:
                res.rel_error = _rel_error(w_old, _weight_out_in(mod).detach(), stats[name].xtx)
            report.layers.append(res)
        stats.clear()

        if feed_next:
            inputs = [(block_output(block(h, *rest, **kw)).detach(), rest, kw) for h, rest, kw in inputs]
        return inputs


@torch.no_grad()
def owl_block_ratios(
    block_list: Sequence[nn.Module],
    per_block: Sequence[list[tuple[str, nn.Module]]],
    inputs: BlockInputs,
    masks: list[torch.Tensor | None],
    m: float = 5.0,
    device: torch.device | None = None,
    block_args: BlockArgs | None = None,
) -> list[float]:
    """OWL's outlier ratio ``D_l`` of every block holding selected Linears, from one *dense* pass.

    The first block's ``inputs`` run through the blocks in order (up to the last with selected Linears);
    in each, hooks accumulate the Linears' input norms and ``D_l`` is the fraction of the block's Wanda
    scores ``|W_ij| * ||X_j||_2`` (all its selected Linears together) above ``m`` times their mean (Yin
    et al. 2024, eq. 2; the paper's reference code also computes the ratios on the dense model before
    pruning). ``block_args``: each block's own call arguments (:func:`calibration_stack_inputs`). Nothing
    is changed. Returns one fraction per block with selected Linears, in order.

    Raises:
        ConfigError: a block output that is not a tensor or a tuple starting with one.
    """
    last = max(i for i, lin in enumerate(per_block) if lin)
    ratios = []
    for bi, block in enumerate(block_list[: last + 1]):
        lin, feed = per_block[bi], bi < last
        inputs = with_block_args(inputs, block_args, bi)
        with _on_device(block, device):
            if lin:
                stats, outs = collect_block_stats(block, lin, inputs, masks, keep_outputs=feed)
                weights = [_weight_out_in(mod) for _, mod in lin]
                ratios.append(layer_outlier_ratio(weights, [stats[n].sq_sum.sqrt() for n, _ in lin], m))
            elif feed:
                outs = [(block_output(block(h, *rest, **kw)).detach(), rest, kw) for h, rest, kw in inputs]
        if feed:
            inputs = outs
    return ratios


def _snapshot_linears(linears: list[tuple[str, nn.Module]]) -> dict[str, tuple[torch.Tensor, Any]]:
    """CPU copies of each Linear's stored weight and of its element mask (None if unmasked)."""
    from secateur.masks.element import element_mask, original

    snap = {}
    for name, mod in linears:
        m = element_mask(mod, "weight")
        snap[name] = (
            original(mod, "weight").detach().to("cpu", copy=True),
            None if m is None else m.mask.detach().to("cpu", copy=True),
        )
    return snap


@torch.no_grad()
def _restore_linears(linears: list[tuple[str, nn.Module]], snap: dict[str, tuple[torch.Tensor, Any]]) -> None:
    """Undo :func:`prune_oneshot`'s changes: masks it attached are removed, weights and masks restored."""
    from torch.nn.utils import parametrize

    from secateur.masks.element import element_mask, original

    for name, mod in linears:
        weight, mask = snap[name]
        m = element_mask(mod, "weight")
        if mask is None and m is not None:
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
        elif mask is not None and m is not None:
            m.mask.copy_(mask.to(m.mask.device))
        original(mod, "weight").copy_(weight.to(original(mod, "weight").device))


@torch.no_grad()
def collect_linear_inputs(
    model: nn.Module,
    data: Iterable[Mapping[str, torch.Tensor]],
    include: str | Callable[[str, nn.Linear], bool] | None = None,
    stop_early: bool = True,
) -> dict[str, torch.Tensor]:
    """Inputs of every selected Linear over all batches at once, ``{name: (tokens, in)}``, padding removed.

    This is the whole-model capture that layer-by-layer pruning avoids: it holds every Linear's
    inputs together. Used as a reference in tests and as the memory baseline of the benchmark.
    ``data`` is the calibration batches, each the keyword arguments of ``model(**batch)``.
    ``include`` is a regex on module names or a predicate ``(name, module) -> bool``. With
    ``stop_early`` each forward pass stops once every selected Linear has run (saves the rest).

    Raises:
        ConfigError: nothing selected by ``include``.
    """
    got: dict[str, list[torch.Tensor]] = {}
    current: dict[str, Any] = {"mask": None, "seen": set()}
    selected = [
        (name, mod)
        for name, mod in model.named_modules()
        if is_linear_like(mod) and _included(name, mod, include)
    ]
    if not selected:
        raise ConfigError(f"no Linear of {type(model).__name__} selected (include={include!r})")
    handles = []
    for name, mod in selected:
        got[name] = []

        def hook(_m: nn.Module, inp: tuple, _out: Any, _name: str = name) -> None:
            x = inp[0].detach()
            m = current["mask"]
            if m is not None and tuple(m.shape) == tuple(x.shape[:-1]):
                x = x[m.to(x.device)]
            got[_name].append(x.reshape(-1, x.shape[-1]).clone())
            current["seen"].add(_name)
            if stop_early and len(current["seen"]) == len(got):
                raise _StopForward

        handles.append(mod.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for batch in data:
            current["mask"] = _token_mask(batch)
            current["seen"] = set()
            try:
                model(**batch)
            except _StopForward:
                pass
    finally:
        for hd in handles:
            hd.remove()
        model.train(was_training)
    return {k: torch.cat(v) for k, v in got.items() if v}


def reconstruction_error(weight: torch.Tensor, new_weight: torch.Tensor, x: torch.Tensor) -> float:
    """``||W X^T - W_hat X^T||_F^2`` for inputs ``x`` ``(tokens, in)`` and weights ``(out, in)``.

    The layer-wise objective of SparseGPT (Frantar & Alistarh 2023, eq. 1) and Wanda's motivation.
    """
    d = (weight.double() - new_weight.double()) @ x.double().T
    return float((d * d).sum())


def sparsity_of(weight: torch.Tensor) -> float:
    """Fraction of exact zeros in ``weight``."""
    return 1.0 - torch.count_nonzero(weight).item() / max(1, weight.numel())


__all__ = [
    "METHODS",
    "Allocation",
    "LayerResult",
    "OneShotReport",
    "BlockArgs",
    "block_call_args",
    "block_output",
    "calibration_inputs",
    "calibration_stack_inputs",
    "check_allocation",
    "collect_block_stats",
    "collect_linear_inputs",
    "find_blocks",
    "is_linear_like",
    "owl_block_ratios",
    "prune_block",
    "prune_linear",
    "prune_linears",
    "prune_oneshot",
    "reconstruction_error",
    "sparsity_of",
    "with_block_args",
]
