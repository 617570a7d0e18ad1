"""Measured latency and peak memory of a forward pass, and :func:`measure`, the one-call summary.

Latency is measured with ``torch.utils.benchmark.Timer`` because it fixes the thread count for the
duration of the timing, synchronises CUDA around each block and reports robust statistics. We time
``repeats`` blocks of ``number`` calls each (``number`` chosen from a warm-up so that one block
lasts about ``block_ms``), and report the *median* and *interquartile range* of the per-call time
over the blocks: the median resists the occasional slow block that a shared machine produces, and
the IQR says how much to trust it. All times are in milliseconds per forward call of the whole
``example_inputs`` batch.

Peak memory on CPU cannot come from ``tracemalloc`` (it sees only Python's allocator, not
PyTorch's). We record every CPU tensor allocation and free made during one forward pass with
``torch.profiler`` (``profile_memory=True``) and take the maximum of their running sum: the peak
of *extra* bytes held by tensors created by the forward (activations, temporaries, outputs), on
top of what was alive before (weights, inputs). On CUDA we use ``torch.cuda.max_memory_allocated``
minus the allocation before the call, which means the same thing. The profiler's C++ back end
(Kineto) writes log lines (``USDT: ... profiler_start``, ``STAGE: ...``) straight to file
descriptor 2 when it starts and stops; we capture descriptor 2 around those two calls only and
write back anything that is not such a line, so a measurement prints nothing of its own.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils import benchmark

from secateur.errors import ConfigError

__all__ = [
    "compare_callables",
    "compare_latency",
    "compare_models",
    "measure",
    "measure_latency",
    "peak_memory",
    "time_callable",
]


def _call(model: Callable[..., Any], example_inputs: Any) -> Any:
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, tuple):
        return model(*example_inputs)
    return model(example_inputs)


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_to(v, device) for v in obj)
    if isinstance(obj, list):
        return [_to(v, device) for v in obj]
    return obj


def _batch_size(example_inputs: Any) -> int | None:
    """Leading dimension of the first tensor found in the inputs (None if there is none)."""
    if isinstance(example_inputs, torch.Tensor):
        return int(example_inputs.shape[0]) if example_inputs.dim() else None
    values = example_inputs.values() if isinstance(example_inputs, Mapping) else example_inputs
    if isinstance(values, (tuple, list)) or isinstance(example_inputs, Mapping):
        for v in values:
            b = _batch_size(v)
            if b is not None:
                return b
    return None


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device must be 'cpu' or 'cuda[:i]', got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but torch.cuda.is_available() is False")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'cpu' or 'cuda[:i]', got {device!r}")
    return dev


def _model_device(model: nn.Module) -> torch.device | None:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return None


def _check_counts(repeats: int, warmup: int, block_ms: float) -> None:
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be an int >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup must be an int >= 0, got {warmup!r}")
    if not block_ms > 0:
        raise ConfigError(f"block_ms must be > 0, got {block_ms!r}")


def _threads(threads: int | None) -> int:
    if threads is None:
        return torch.get_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be an int >= 1 or None, got {threads!r}")
    return threads


def _summary(
    m: benchmark.Measurement, *, calls_per_block: int, threads: int, device: str, batch: int | None
) -> dict[str, Any]:
    times = m.times  # seconds per call, one entry per block (merge divides by calls per block)
    t = torch.tensor(times, dtype=torch.float64)
    q1, q3 = t.quantile(torch.tensor([0.25, 0.75], dtype=torch.float64))
    return {
        "median_ms": m.median * 1e3,
        "iqr_ms": m.iqr * 1e3,
        "q1_ms": float(q1) * 1e3,
        "q3_ms": float(q3) * 1e3,
        "mean_ms": m.mean * 1e3,
        "min_ms": min(times) * 1e3,
        "n": len(times),
        "calls_per_block": calls_per_block,
        "threads": threads,
        "device": device,
        "batch_size": batch,
    }


class _Bench:
    """One callable under a ``benchmark.Timer`` with a fixed number of calls per block."""

    def __init__(self, fn: Callable[[], Any], threads: int, label: str) -> None:
        self.timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, label=label)
        self.number = 1
        self.blocks: list[benchmark.Measurement] = []

    def calibrate(self, warmup: int, block_ms: float) -> None:
        """Warm up, then size blocks from the fastest of a few single calls: on a busy machine one
        call can stall for many times its cost, and sizing from it would leave one call per block."""
        for _ in range(warmup):
            self.timer.timeit(1)
        est = min(self.timer.timeit(1).median for _ in range(3))
        self.number = max(1, math.ceil(block_ms / 1e3 / max(est, 1e-9)))

    def block(self) -> None:
        self.blocks.append(self.timer.timeit(self.number))

    def summary(self, *, threads: int, device: str, batch: int | None) -> dict[str, Any]:
        merged = benchmark.Measurement.merge(self.blocks)
        if len(merged) != 1:  # pragma: no cover - same task spec for every block
            raise RuntimeError("benchmark blocks did not merge into one measurement")
        return _summary(merged[0], calls_per_block=self.number, threads=threads, device=device, batch=batch)


def time_callable(
    fn: Callable[[], Any],
    *,
    threads: int | None = None,
    repeats: int = 30,
    warmup: int = 3,
    block_ms: float = 10.0,
    label: str = "callable",
) -> dict[str, Any]:
    """Median and IQR of the time of ``fn()`` (any zero-argument callable), in milliseconds per call.

    Used for runtimes other than PyTorch (ONNX Runtime). ``threads`` is the torch thread count held
    during timing (default: the current ``torch.get_num_threads()``).

    Returns:
        ``{"median_ms", "iqr_ms", "q1_ms", "q3_ms", "mean_ms", "min_ms", "n" (blocks),
        "calls_per_block", "threads", "device": "cpu", "batch_size": None}``.

    Raises:
        ConfigError: ``repeats`` < 1, ``warmup`` < 0, ``block_ms`` <= 0 or ``threads`` < 1.
    """
    _check_counts(repeats, warmup, block_ms)
    n_threads = _threads(threads)
    bench = _Bench(fn, n_threads, label)
    bench.calibrate(warmup, block_ms)
    for _ in range(repeats):
        bench.block()
    return bench.summary(threads=n_threads, device="cpu", batch=None)


def _interleaved(benches: list[_Bench], repeats: int, warmup: int, block_ms: float) -> None:
    """Calibrate every bench, then time one block of each per round, reversing the order every
    other round, so that slow drifts in machine load affect all of them alike."""
    for b in benches:
        b.calibrate(warmup, block_ms)
    for r in range(repeats):
        for b in benches if r % 2 == 0 else benches[::-1]:
            b.block()


def compare_callables(
    fns: Mapping[str, Callable[[], Any]],
    *,
    threads: int | None = None,
    repeats: int = 30,
    warmup: int = 3,
    block_ms: float = 10.0,
) -> dict[str, dict[str, Any]]:
    """Time several zero-argument callables interleaved in one run (see :func:`compare_latency`).

    Returns:
        ``{name: <time_callable dict>}`` in the order of ``fns`` (ms per call, median and IQR).

    Raises:
        ConfigError: as :func:`time_callable`, or ``fns`` is empty.
    """
    _check_counts(repeats, warmup, block_ms)
    if not fns:
        raise ConfigError("compare_callables needs at least one callable")
    n_threads = _threads(threads)
    benches = {name: _Bench(fn, n_threads, name) for name, fn in fns.items()}
    _interleaved(list(benches.values()), repeats, warmup, block_ms)
    return {
        name: b.summary(threads=n_threads, device="cpu", batch=None) for name, b in benches.items()
    }


class _Prepared:
    """A model and inputs on the measuring device, in eval mode, restored on exit."""

    def __init__(self, model: nn.Module, example_inputs: Any, device: torch.device) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.original = model
        current = _model_device(model)
        if current is not None and current.type != device.type:
            model = copy.deepcopy(model).to(device)  # never move the caller's model
        self.model = model
        self.inputs = _to(example_inputs, device)
        self.was_training = model.training
        self.orig_training = self.original.training

    def __enter__(self) -> _Prepared:
        self.model.eval()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.model.train(self.was_training)
        self.original.train(self.orig_training)

    def forward(self) -> Callable[[], Any]:
        model, inputs = self.model, self.inputs

        def fn() -> Any:
            with torch.no_grad():
                return _call(model, inputs)

        return fn


def measure_latency(
    model: nn.Module,
    example_inputs: Any,
    *,
    threads: int | None = None,
    repeats: int = 30,
    warmup: int = 3,
    block_ms: float = 10.0,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Measured forward latency of ``model`` on ``example_inputs`` (a tensor, a tuple of positional
    arguments, or a dict of keyword arguments), in eval mode under ``torch.no_grad()``.

    The model's train/eval mode is restored afterwards. If the model lives on another device type
    than ``device``, a copy is moved there; the caller's model is never moved. Inputs are moved to
    ``device``.

    Args:
        threads: torch intra-op threads during timing (default: current ``torch.get_num_threads()``).
        repeats: number of timed blocks (the statistics are over blocks).
        warmup: untimed calls before calibration (first calls allocate and pick kernels).
        block_ms: target duration of one block, in ms; sets the calls per block.
        device: ``"cpu"`` or ``"cuda[:i]"`` (CUDA only when ``torch.cuda.is_available()``).

    Returns:
        ``{"median_ms", "iqr_ms", "q1_ms", "q3_ms", "mean_ms", "min_ms"}`` (milliseconds per forward
        of the whole batch; IQR = q3 - q1),
        ``"n"`` (blocks), ``"calls_per_block"``, ``"threads"``, ``"device"`` and ``"batch_size"``
        (leading dimension of the first input tensor, or None).

    Raises:
        ConfigError: bad ``repeats``/``warmup``/``block_ms``/``threads``, an unknown device, or CUDA
            requested without CUDA. TypeError: ``model`` is not an ``nn.Module``.
    """
    _check_counts(repeats, warmup, block_ms)
    n_threads = _threads(threads)
    dev = _resolve_device(device)
    with _Prepared(model, example_inputs, dev) as prep:
        bench = _Bench(prep.forward(), n_threads, type(model).__name__)
        bench.calibrate(warmup, block_ms)
        for _ in range(repeats):
            bench.block()
        return bench.summary(threads=n_threads, device=str(dev), batch=_batch_size(example_inputs))


def compare_models(
    models: Mapping[str, nn.Module],
    example_inputs: Any,
    *,
    threads: int | None = None,
    repeats: int = 30,
    warmup: int = 3,
    block_ms: float = 10.0,
    device: str | torch.device = "cpu",
    inputs: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Eager latency of several models measured in one interleaved run: one block of each in turn, the
    order reversed every other round, so a change in machine load hits all of them alike.

    Each model runs in eval mode under ``torch.no_grad()`` (modes restored afterwards); a model on another
    device type than ``device`` is timed from a moved copy.

    Args:
        models: ``{name: model}``, timed in this order (at least one).
        inputs: per-model inputs where they differ (``{name: inputs}``; default: ``example_inputs``).
        Others: as :func:`measure_latency`.

    Returns:
        ``{name: <measure_latency dict>}`` (ms per forward of the whole batch; median, IQR, ...).

    Raises:
        As :func:`measure_latency`; ConfigError: ``models`` is empty.
    """
    _check_counts(repeats, warmup, block_ms)
    if not models:
        raise ConfigError("compare_models needs at least one model")
    n_threads = _threads(threads)
    dev = _resolve_device(device)
    given = dict(inputs or {})
    with contextlib.ExitStack() as stack:
        benches, batches = [], []
        for name, model in models.items():
            x = given.get(name, example_inputs)
            prep = stack.enter_context(_Prepared(model, x, dev))
            benches.append(_Bench(prep.forward(), n_threads, name))
            batches.append(_batch_size(x))
        _interleaved(benches, repeats, warmup, block_ms)
        return {
            name: b.summary(threads=n_threads, device=str(dev), batch=batch)
            for name, b, batch in zip(models, benches, batches)
        }


def compare_latency(
    dense: nn.Module,
    pruned: nn.Module,
    example_inputs: Any,
    *,
    threads: int | None = None,
    repeats: int = 30,
    warmup: int = 3,
    block_ms: float = 10.0,
    device: str | torch.device = "cpu",
    pruned_inputs: Any = None,
) -> dict[str, Any]:
    """Latency of two models measured in one interleaved run: dense block, pruned block, and so on
    (the order alternates every round), so a change in machine load hits both alike
    (:func:`compare_models` with two models).

    Args:
        pruned_inputs: inputs for ``pruned`` when they differ (default: ``example_inputs``).
        Others: as :func:`measure_latency`.

    Returns:
        ``{"dense": <measure_latency dict>, "pruned": <dict>, "speedup": dense median / pruned
        median}`` (a ratio; > 1 means the pruned model is faster).

    Raises:
        As :func:`measure_latency`.
    """
    res: dict[str, Any] = compare_models(
        {"dense": dense, "pruned": pruned},
        example_inputs,
        threads=threads,
        repeats=repeats,
        warmup=warmup,
        block_ms=block_ms,
        device=device,
        inputs=None if pruned_inputs is None else {"pruned": pruned_inputs},
    )
    res["speedup"] = res["dense"]["median_ms"] / res["pruned"]["median_ms"]
    return res


# Kineto's own log lines on profiler start/stop (torch 2.x): "USDT:<date> <pid>:<tid> File.cpp:NN] ...",
# "STAGE:<date> <pid>:<tid> ActivityProfilerController.cpp:NN] ...".
_PROFILER_NOISE = re.compile(r"^(USDT|STAGE):|ActivityProfiler(Controller|Handler)?\.cpp:\d+\]")


@contextlib.contextmanager
def _quiet_profiler_stderr() -> Iterator[None]:
    """Capture file descriptor 2 for the block; afterwards re-emit every line that is not profiler noise.

    Works at the descriptor level because Kineto writes from C++, bypassing ``sys.stderr``. If
    descriptor 2 cannot be duplicated (closed, or a platform without ``dup``), the block runs
    unchanged. Not thread-safe with respect to other threads writing to stderr meanwhile (their
    lines are delayed to the end of the block, not lost).
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", errors="replace")
            kept = [ln for ln in text.splitlines(keepends=True) if not _PROFILER_NOISE.search(ln)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_profiler_stderr():
        prof.start()
    try:
        out = fn()  # the user's forward runs with stderr untouched
        del out
    finally:
        with _quiet_profiler_stderr():
            prof.stop()
    from torch.autograd import DeviceType

    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ]
    current = peak = 0
    for _, nbytes in sorted(events):
        current += nbytes
        peak = max(peak, current)
    return peak


def peak_memory(
    model: nn.Module, example_inputs: Any, *, device: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Peak memory of one forward pass (eval mode, ``torch.no_grad()``), in bytes.

    ``peak_activation_bytes`` is the most memory held at once by tensors allocated during the
    forward (activations, temporaries and the output), above what was alive before the call. On
    CPU it comes from ``torch.profiler`` allocation records (PyTorch's CPU allocator only: memory
    that a library such as oneDNN allocates itself is not seen); on CUDA from
    ``torch.cuda.max_memory_allocated``. ``param_bytes`` and ``buffer_bytes`` are the model's
    resident parameters and buffers (masks included), counted once each.

    Returns:
        ``{"peak_activation_bytes": int, "param_bytes": int, "buffer_bytes": int, "device": str,
        "method": "torch.profiler" | "cuda.max_memory_allocated"}``.

    Raises:
        ConfigError: unknown device or CUDA requested without CUDA. TypeError: not an ``nn.Module``.
    """
    dev = _resolve_device(device)
    with _Prepared(model, example_inputs, dev) as prep:
        fn = prep.forward()
        fn()  # warm-up: lazy initialisation would otherwise count as activation memory
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            out = fn()
            torch.cuda.synchronize(dev)
            peak = torch.cuda.max_memory_allocated(dev) - base
            del out
            method = "cuda.max_memory_allocated"
        else:
            peak = _cpu_peak_bytes(fn)
            method = "torch.profiler"
        params = {id(p): p.numel() * p.element_size() for p in prep.model.parameters()}
        buffers = {id(b): b.numel() * b.element_size() for b in prep.model.buffers()}
    return {
        "peak_activation_bytes": int(peak),
        "param_bytes": int(sum(params.values())),
        "buffer_bytes": int(sum(buffers.values())),
        "device": str(dev),
        "method": method,
    }


def measure(
    model: nn.Module,
    example_inputs: Any,
    latency: bool = True,
    *,
    memory: bool = False,
    threads: int | None = None,
    repeats: int = 30,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Parameters, non-zero parameters, MACs (dense and sparse) and, optionally, latency and memory.

    Counts come from :func:`secateur.analysis.count_params` and :func:`count_macs` (MACs, not
    FLOPs: FLOPs ≈ 2 × MACs; attention and functional ops included). ``sparsity`` is the fraction
    of parameters that are zero.

    Returns:
        ``{"params", "nonzero_params", "sparsity", "macs", "sparse_macs"}`` plus, with ``latency``,
        ``"latency_ms"`` (median), ``"latency_iqr_ms"`` and ``"latency"`` (the full
        :func:`measure_latency` dict), and with ``memory``, ``"memory"`` (:func:`peak_memory`).

    Raises:
        As :func:`measure_latency`.
    """
    from secateur.analysis.counting import count_macs, count_params

    out: dict[str, Any] = {**count_params(model)}
    out["sparsity"] = 1.0 - out["nonzero_params"] / out["params"] if out["params"] else 0.0
    was_training = model.training
    model.eval()
    try:
        out.update(count_macs(model, example_inputs if _model_device(model) is None else
                              _to(example_inputs, _model_device(model))))
    finally:
        model.train(was_training)
    if latency:
        lat = measure_latency(model, example_inputs, threads=threads, repeats=repeats, device=device)
        out["latency_ms"] = lat["median_ms"]
        out["latency_iqr_ms"] = lat["iqr_ms"]
        out["latency"] = lat
    if memory:
        out["memory"] = peak_memory(model, example_inputs, device=device)
    return out
