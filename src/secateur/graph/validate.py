"""Checks on example inputs at the tracer's entry (the model itself: :func:`secateur._validate.check_model`).

An out-of-vocabulary token id is a :class:`~secateur.errors.ConfigError` naming the input
(``example_inputs['input_ids']``) and the embedding layer, instead of a raw ``IndexError`` from inside torch
(or, during a meta trace, no error at all until the oracle runs).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from secateur.errors import ConfigError


def integer_inputs(example_inputs: Any, label: str = "example_inputs") -> Iterator[tuple[torch.Tensor, str]]:
    """``(tensor, label)`` for every integer tensor in ``example_inputs`` (a tensor, nested tuples/lists,
    dicts), labelled by where it sits: ``example_inputs['input_ids']``, ``example_inputs[0]``."""
    if isinstance(example_inputs, torch.Tensor):
        if not example_inputs.is_floating_point() and not example_inputs.is_complex():
            yield example_inputs, label
    elif isinstance(example_inputs, (tuple, list)):
        for i, x in enumerate(example_inputs):
            yield from integer_inputs(x, f"{label}[{i}]")
    elif isinstance(example_inputs, dict):
        for k, x in example_inputs.items():
            yield from integer_inputs(x, f"{label}[{k!r}]")


def check_embedding_indices(ids: torch.Tensor, n_rows: int, label: str, where: str) -> None:
    """Raise ConfigError if an index of ``ids`` (real values, any integer dtype) is outside ``[0, n_rows)``:
    an out-of-vocabulary token id fed to an embedding table of ``n_rows`` rows. ``label`` names the input,
    ``where`` the op and module (``"op 'embedding' in module 'embed' (Embedding)"``)."""
    if ids.numel() == 0 or ids.dtype == torch.bool:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= n_rows:
        bad = hi if hi >= n_rows else lo
        raise ConfigError(
            f"{label} holds index {bad}, outside [0, {n_rows}) for {where} (an embedding table of "
            f"{n_rows} rows, i.e. num_embeddings / vocab_size): pass ids the model's vocabulary contains"
        )
