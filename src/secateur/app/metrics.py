"""The task's metric, chosen by the model's kind and the data (the command line's evaluation).

* ``accuracy``: top-1 accuracy (fraction, 0-1) of a classifier on labelled images.
* ``perplexity``: ``exp`` of the mean next-token cross-entropy (nats) of a causal LM over every predicted
  token of the held-out blocks (the standard definition; e.g. Radford et al. 2019, Frantar & Alistarh 2023
  report it the same way on fixed-length blocks), summed in float64.
* ``cosine``: the mean cosine similarity (-1 to 1; 1 = identical direction) between a model's outputs and
  the dense model's on the held-out data: mean-pooled ``last_hidden_state`` over the attention mask for an
  encoder without a head (Sentence-BERT MEAN pooling, Reimers & Gurevych 2019), the flattened logits
  otherwise. The dense model scores 1.0 by definition.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from secateur.app.inputs import ModelKind
from secateur.errors import ConfigError

__all__ = ["METRICS", "Evaluator", "LogitsOf", "choose_metric", "logits_of"]

#: Metric names, and whether higher is better.
METRICS: dict[str, bool] = {"accuracy": True, "perplexity": False, "cosine": True}


def logits_of(output: Any) -> torch.Tensor:
    """The logits tensor of a model output: the tensor itself, ``output.logits``, or the first tuple item.

    Raises:
        ConfigError: an output with none of these.
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ConfigError(f"the model's output ({type(output).__name__}) has no logits tensor")


class LogitsOf(nn.Module):
    """``model`` seen as a function of one positional tensor returning logits, for the classification
    :class:`~secateur.train.Trainer` (a Hugging Face classifier takes ``pixel_values=`` and returns an
    output object). The wrapped model's parameters are the wrapper's (``self.model``)."""

    def __init__(self, model: nn.Module, input_name: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.input_name = input_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, classes)`` of ``x`` (passed as ``input_name=`` when set, else positionally)."""
        out = self.model(**{self.input_name: x}) if self.input_name else self.model(x)
        return logits_of(out)


def choose_metric(kind: ModelKind, data_kind: str) -> str | None:
    """The metric of a model ``kind`` on data of ``data_kind`` (``"images"``, ``"text"``, ``"none"``).

    Labelled images: ``accuracy`` for a classifier, ``cosine`` for an image encoder; text: ``perplexity``
    for a causal LM, ``cosine`` otherwise; no data: None.
    """
    if data_kind == "none":
        return None
    if data_kind == "images":
        return "accuracy" if kind.task == "classifier" else "cosine"
    return "perplexity" if kind.task == "causal-lm" else "cosine"


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(batch)


def _inputs(batch: Any, input_name: str | None) -> Any:
    """The model inputs of a batch: a text dict as is, the ``x`` of an ``(x, y)`` pair (keyword when the
    model names its input)."""
    if isinstance(batch, Mapping):
        return batch
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return {input_name: x} if input_name else x


def _pooled(output: Any, batch: Any) -> torch.Tensor:
    """``(B, d)`` float64: mean of ``last_hidden_state`` over the attention mask, or flattened logits."""
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        m = torch.ones(hidden.shape[:2]) if mask is None else mask.to(hidden.dtype)
        m = m.unsqueeze(-1).double()
        return (hidden.double() * m).sum(1) / m.sum(1).clamp_min(1.0)
    return logits_of(output).double().flatten(1)


class Evaluator:
    """Measures the metric of models on one held-out loader; for ``cosine`` it first records the dense
    model's outputs (:meth:`set_reference`).

    Args:
        metric: a :data:`METRICS` name.
        loader: held-out batches (``(x, y)`` pairs for accuracy, text dicts otherwise).
        input_name: the keyword a Hugging Face model takes images by (``pixel_values``), else None.

    Raises:
        ConfigError: an unknown metric.
    """

    def __init__(self, metric: str, loader: Any, input_name: str | None = None) -> None:
        if metric not in METRICS:
            raise ConfigError(f"unknown metric {metric!r}; allowed: {list(METRICS)}")
        self.metric = metric
        self.loader = loader
        self.input_name = input_name
        self.reference: list[torch.Tensor] | None = None

    @torch.no_grad()
    def _outputs(self, model: nn.Module) -> list[torch.Tensor]:
        from secateur._torch import eval_mode

        with eval_mode(model):
            out = []
            for batch in self.loader:
                x = _inputs(batch, self.input_name)
                out.append(_pooled(_call(model, x), x))
            return out

    def set_reference(self, dense: nn.Module) -> None:
        """Record ``dense``'s pooled outputs, the reference of the ``cosine`` metric."""
        self.reference = self._outputs(dense)

    @torch.no_grad()
    def accuracy(self, model: nn.Module) -> float:
        """Top-1 accuracy (fraction) on the ``(x, y)`` batches.

        Raises:
            ConfigError: the model has fewer outputs than the data has classes (named), or no example.
        """
        from secateur._torch import eval_mode

        correct = seen = 0
        with eval_mode(model):
            for x, y in self.loader:
                logits = logits_of(_call(model, _inputs((x, y), self.input_name)))
                if logits.dim() != 2 or logits.shape[1] <= int(y.max()):
                    raise ConfigError(
                        f"the model gives outputs of shape {tuple(logits.shape)} but the data has labels "
                        "up to "
                        f"{int(y.max())}: it does not classify this data's classes"
                    )
                correct += int((logits.argmax(1) == y).sum())
                seen += int(y.numel())
        if seen == 0:
            raise ConfigError("no held-out examples to evaluate")
        return correct / seen

    @torch.no_grad()
    def perplexity(self, model: nn.Module) -> float:
        """``exp(mean next-token NLL)`` over every predicted, unmasked token of the held-out blocks."""
        from secateur._torch import eval_mode

        nll, count = 0.0, 0
        with eval_mode(model):
            for batch in self.loader:
                logits = logits_of(model(**batch, use_cache=False))
                ids, mask = batch["input_ids"], batch["attention_mask"]
                target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                loss = nn.functional.cross_entropy(
                    logits[:, :-1].double().flatten(0, 1),
                    target.flatten(),
                    ignore_index=-100,
                    reduction="sum",
                )
                nll += float(loss)
                count += int((target != -100).sum())
        if count == 0:
            raise ConfigError("no held-out tokens to evaluate")
        return math.exp(nll / count)

    def cosine(self, model: nn.Module) -> float:
        """Mean cosine similarity of ``model``'s pooled outputs to the reference's, per example, in float64.

        Raises:
            ConfigError: no reference recorded, or outputs of another shape (a pruned hidden size).
        """
        if self.reference is None:
            raise ConfigError("the cosine metric needs the dense model's outputs first (set_reference)")
        out = self._outputs(model)
        total, n = 0.0, 0
        for a, b in zip(out, self.reference):
            if a.shape != b.shape:
                raise ConfigError(
                    f"outputs of shape {tuple(a.shape)} cannot be compared with the dense model's "
                    f"{tuple(b.shape)} (the output width was pruned)"
                )
            total += float(nn.functional.cosine_similarity(a, b, dim=-1).sum())
            n += a.shape[0]
        return total / max(n, 1)

    def __call__(self, model: nn.Module) -> float:
        """The metric of ``model``."""
        return getattr(self, self.metric)(model)
