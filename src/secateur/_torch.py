"""The lowest layer of torch helpers: example inputs, calling a model on them, the tensors inside nested
outputs, op names, and a BaseException-safe eval mode.

Every layer above may import this module; it imports only :mod:`secateur.errors` and torch.

- Example inputs: one input is a tensor, a tuple of positional inputs or a dict of keyword inputs
  (:func:`call_model`); :class:`ExampleInputs` lists several (each traced or run in turn).
- Nested values: :func:`iter_tensors` / :func:`list_tensors` find the tensors inside tuples, lists, dicts,
  dataclasses (Hugging Face ``ModelOutput``) and :class:`ExampleInputs`.
- :func:`op_name`: the registry key of a torch callable (``Tensor.__iadd__`` -> ``"iadd"``).
- :func:`eval_mode`: run a block with every module in eval mode, each module's own mode restored after.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from secateur.errors import ConfigError

__all__ = [
    "ExampleInputs",
    "as_examples",
    "call_model",
    "eval_mode",
    "iter_tensors",
    "list_tensors",
    "op_name",
]


class ExampleInputs:
    """An explicit list of example inputs, each one what a single ``example_inputs`` may be: a tensor, a
    tuple of positional inputs or a dict of keyword inputs.

    Why: a model whose forward takes a branch by a data-dependent Python ``if`` is traced along one branch
    per input; ``ExampleInputs([x_a, x_b])`` traces each input in turn into one atom store, so the
    couplings seen on every branch merge. A plain list cannot mean this (a list is already one valid input
    for some models: ``model(*list)``), hence the wrapper. Accepted by
    :meth:`secateur.graph.DependencyGraph.build` (one trace per input, the couplings merged), by
    :func:`call_model` (one forward per input; returns the tuple of their outputs) and so by the
    equivalence oracle (:mod:`secateur.compact.verify`: every input must pass).

    Raises:
        ConfigError: no inputs, or an ``ExampleInputs`` nested in another.
    """

    __slots__ = ("inputs",)

    def __init__(self, inputs: Iterable[Any]) -> None:
        items = tuple(inputs)
        if not items:
            raise ConfigError("ExampleInputs needs at least one example input, got none")
        if any(isinstance(x, ExampleInputs) for x in items):
            raise ConfigError("ExampleInputs cannot be nested: list every example input once")
        self.inputs: tuple[Any, ...] = items

    def __len__(self) -> int:
        return len(self.inputs)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.inputs)

    def __getitem__(self, i: int) -> Any:
        return self.inputs[i]

    def map(self, fn: Callable[[Any], Any]) -> ExampleInputs:
        """``ExampleInputs([fn(x) for x in self])``: e.g. a dtype or device conversion of every input."""
        return ExampleInputs(fn(x) for x in self.inputs)

    def __repr__(self) -> str:
        return f"ExampleInputs({len(self.inputs)} inputs)"


def as_examples(example_inputs: Any) -> tuple[Any, ...]:
    """The example inputs one by one: the items of an :class:`ExampleInputs`, else ``(example_inputs,)``."""
    if isinstance(example_inputs, ExampleInputs):
        return example_inputs.inputs
    return (example_inputs,)


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """Call ``model`` on a tensor, a tuple of positional inputs or a dict of keyword inputs; on an
    :class:`ExampleInputs`, once per input, returning the tuple of outputs. Whatever the model raises
    propagates unchanged."""
    if isinstance(example_inputs, ExampleInputs):
        return tuple(call_model(model, x) for x in example_inputs)
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def list_tensors(obj: Any) -> list[torch.Tensor]:
    """``list(iter_tensors(obj))``, faster for the common flat cases (a tensor, a tuple of tensors and
    scalars, a dict of those)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        out = []
        for o in obj:
            if isinstance(o, torch.Tensor):
                out.append(o)
            elif isinstance(o, (tuple, list, dict)) or dataclasses.is_dataclass(o):
                out.extend(iter_tensors(o, 1))
        return out
    if isinstance(obj, dict):
        return list_tensors(tuple(obj.values())) if obj else []
    return list(iter_tensors(obj))


def iter_tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors inside nested tuples, lists, dicts, dataclasses (Hugging Face ModelOutput included) and
    :class:`ExampleInputs`, depth first, in order (at most 7 levels deep).

    Cache objects and other classes are not entered: a key/value cache is not a model output to protect.
    """
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 6:
        return
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from iter_tensors(o, depth + 1)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from iter_tensors(o, depth + 1)
    elif isinstance(obj, ExampleInputs):
        for o in obj.inputs:
            yield from iter_tensors(o, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from iter_tensors(getattr(obj, f.name, None), depth + 1)


_OP_NAMES: dict[Any, str] = {}


def op_name(func: Any) -> str:
    """Registry key of a torch callable: its bare name without underscores (``torch.conv2d`` ->
    ``"conv2d"``, ``Tensor.__iadd__`` -> ``"iadd"``, the getter of ``Tensor.T`` -> ``"T"``). Cached per
    callable (at most 4096 entries)."""
    try:
        return _OP_NAMES[func]
    except (KeyError, TypeError):
        pass
    name = getattr(func, "__name__", None) or str(func)
    if name == "__get__":  # property getters (Tensor.T, Tensor.data) arrive as their __get__
        name = getattr(getattr(func, "__self__", None), "__name__", name)
        return name.strip("_")  # a fresh method-wrapper per access: not cached
    name = name.strip("_")
    if len(_OP_NAMES) < 4096:
        try:
            _OP_NAMES[func] = name
        except TypeError:
            pass
    return name


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with ``model`` and all its submodules in eval mode (dropout off, batch-norm running
    statistics read, not updated); afterwards every module gets back its *own* training flag, whatever
    the block raised (``KeyboardInterrupt`` included). ``model.train(was)`` would not do: it sets one flag
    for all modules and so loses a frozen batch norm kept in eval inside a model in training.

    Yields ``model``.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was in modes:
            if m.training is not was:
                m.training = was


def scratch_view(scratch: dict, shape: Iterable[int], like: torch.Tensor) -> torch.Tensor:
    """A contiguous ``shape`` view of one buffer kept in ``scratch`` per (dtype, device) of ``like``, grown
    when too small. For temporaries of a loop over a model's weights: a fresh large tensor per weight costs
    its page faults, about as much as the arithmetic on CPU. The view is overwritten by the next call."""
    shape = tuple(shape)
    n = 1
    for s in shape:
        n *= int(s)
    key = (like.dtype, like.device)
    buf = scratch.get(key)
    if buf is None or buf.numel() < n:
        buf = scratch[key] = torch.empty(n, dtype=like.dtype, device=like.device)
    return buf[:n].view(shape)
