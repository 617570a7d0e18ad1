"""Several example inputs for one graph: the traces of all of them are merged.

A model whose forward takes a branch by a data-dependent Python ``if`` is traced along one branch per input;
``ExampleInputs([x_a, x_b])`` traces each input in turn with one atom store, so the union-find couples the
channels seen on every branch (a layer's weight has the same atoms in every trace).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from secateur.errors import ConfigError


class ExampleInputs:
    """An explicit list of example inputs, each one what a single ``example_inputs`` may be: a tensor, a
    tuple of positional inputs or a dict of keyword inputs.

    A plain list cannot mean this (a list is already one valid input for some models: ``model(*list)``),
    hence the wrapper. Accepted by :meth:`secateur.graph.DependencyGraph.build` (one trace per input, the
    couplings merged) and by :func:`secateur.graph.tracer.call_model` (one forward per input; returns the
    tuple of their outputs).

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
    """The example inputs to trace: the items of an :class:`ExampleInputs`, else ``(example_inputs,)``."""
    if isinstance(example_inputs, ExampleInputs):
        return example_inputs.inputs
    return (example_inputs,)
