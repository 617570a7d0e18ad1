"""Run a recipe on a model and a dataset: the glue behind ``secateur prune``.

dense evaluation → prune (as the recipe's granularity, criterion, allocation and schedule say)
while fine-tuning → pruned evaluation → measurement → save (pickle-free) and metrics.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateur.analysis import count_macs, count_params
from secateur.errors import ConfigError
from secateur.pruners.recipe import Recipe


def evaluate_accuracy(model: nn.Module, loader: Any) -> float:
    """Top-1 accuracy (a fraction, 0 to 1) of ``model`` on the ``(x, y)`` batches of ``loader``."""
    from secateur.train import Trainer

    return Trainer(model, loader, epochs=1, progress=False).evaluate(loader)["accuracy"]


def _finetune(model: nn.Module, recipe: Recipe, train: Any, test: Any, callbacks: list, progress: bool):
    from secateur.train import Trainer

    ft = recipe.finetune
    trainer = Trainer(
        model,
        train,
        test,
        epochs=max(1, ft.epochs),
        optimizer=ft.optimizer,
        lr=ft.lr,
        lr_schedule=ft.lr_schedule,
        weight_decay=ft.weight_decay,
        callbacks=callbacks,
        progress=progress,
    )
    trainer.fit()
    return trainer


def _prune_oneshot_linears(model: nn.Module, recipe: Recipe, data: Any) -> float:
    """Wanda / SparseGPT at N:M on the recipe's Linear layers (:func:`secateur.llm.prune_linears`), masks
    left attached; returns the achieved sparsity of the pruned Linear weights."""
    from secateur.llm.oneshot import prune_linears

    if data is None:
        raise ConfigError(
            f"criterion {recipe.criterion!r} scores weights by their input activations: it needs calibration "
            "data (use --data fashion-mnist, not --data none)"
        )
    extra = set(recipe.criterion_kwargs) - {"block_size", "damp"}
    if extra:
        raise ConfigError(
            f"criterion_kwargs {sorted(extra)} do not apply to {recipe.criterion!r} at N:M; "
            "allowed: ['block_size', 'damp'] (SparseGPT)"
        )
    report = prune_linears(
        model,
        data,
        method=recipe.criterion,
        pattern=recipe.nm,
        scope=recipe.to_scope(),
        **recipe.criterion_kwargs,
    )
    return report.overall_sparsity


def prune_with_recipe(
    model: nn.Module,
    recipe: Recipe,
    train_loader: Any = None,
    test_loader: Any = None,
    example_inputs: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Prune ``model`` as ``recipe`` says, fine-tuning on ``train_loader`` if the recipe fine-tunes.

    The pruner is :meth:`Recipe.build`'s (element masks, N:M masks or the channel driver), stepped by the
    :class:`~secateur.train.Trainer` (or once at step 0 without fine-tuning) and finalised; Wanda/SparseGPT
    at N:M run :func:`secateur.llm.prune_linears` on ``recipe.data_batches`` training batches. Then
    BatchNorm statistics are re-estimated (``finetune.recalibrate_bn``).

    Returns a dict with ``model`` (the pruned model: a new object after channel compaction), ``plan``
    (structural plan or None), ``sparsity`` (achieved fraction of the recipe's target) and ``bn_batches``.

    Raises:
        ConfigError: a fine-tuning recipe without training data, channel pruning without example inputs,
            Wanda/SparseGPT without data, and whatever the pruner raises on this model (named).
    """
    from secateur.masks import detach_masks

    out: dict[str, Any] = {"plan": None}
    needs_training = recipe.finetune.epochs > 0
    if needs_training and train_loader is None:
        raise ConfigError("recipe fine-tunes (finetune.epochs > 0) but no training data was given")
    steps = recipe.total_steps(len(train_loader)) if train_loader is not None else 1
    data = recipe.data_from(train_loader)
    if recipe.is_oneshot_method:
        out["sparsity"] = _prune_oneshot_linears(model, recipe, data)
        if needs_training:
            _finetune(model, recipe, train_loader, test_loader, [], progress)
        detach_masks(model)
    else:
        pruner = recipe.build(model, example_inputs, data, total_steps=steps)
        if needs_training:
            _finetune(model, recipe, train_loader, test_loader, [pruner], progress)
        else:
            pruner.step(0)
        out["sparsity"] = pruner.sparsity()
        model = pruner.finalize()
        out["plan"] = getattr(pruner, "plan", None)
    out["bn_batches"] = _recalibrate(model, recipe, train_loader)
    out["model"] = model
    return out


def _recalibrate(model: nn.Module, recipe: Recipe, train_loader: Any) -> int:
    """Re-estimate BatchNorm statistics (``finetune.recalibrate_bn`` batches); returns the number used."""
    from secateur.train import recalibrate_bn

    n = recipe.finetune.recalibrate_bn
    bn = nn.modules.batchnorm._BatchNorm
    has_bn = any(isinstance(m, bn) and m.track_running_stats for m in model.modules())
    if n == 0 or train_loader is None or not has_bn:
        return 0
    return recalibrate_bn(model, train_loader, num_batches=n)


def load_data(data: str, recipe: Recipe, subset: int | None = None) -> tuple[Any, Any, torch.Tensor]:
    """The data ``secateur prune --data DATA`` runs on: ``(train loader, test loader, example inputs)``.

    ``"fashion-mnist"``: :func:`secateur.data.fashion_mnist_loaders` with the recipe's fine-tuning batch size,
    ``subset`` (first N images of each split) and the recipe's seed (the shuffle of epoch 0 is the same on
    every call); ``"none"``: no loaders. Example inputs: one zero image, ``(1, 1, 28, 28)`` float32.
    A data-dependent criterion gets ``recipe.data_from(train)`` (:meth:`Recipe.data_from`: the first
    ``data_batches`` training batches of epoch 0), so a caller reproduces the CLI's calibration batches with
    ``recipe.data_from(load_data(data, recipe, subset)[0])``.

    Raises:
        ConfigError: unknown ``data``, a bad ``subset``; DataError: Fashion-MNIST files missing or damaged.
    """
    example = torch.zeros(1, 1, 28, 28)
    if data == "none":
        return None, None, example
    if data != "fashion-mnist":
        raise ConfigError(f"unknown data {data!r}; allowed: 'fashion-mnist', 'none'")
    from secateur.data import fashion_mnist_loaders

    ft = recipe.finetune
    train, test = fashion_mnist_loaders(batch_size=ft.batch_size, subset=subset, seed=recipe.seed)
    return train, test, example


def run(
    model_spec: str,
    recipe: Recipe,
    out_dir: str | Path,
    data: str = "fashion-mnist",
    subset: int | None = None,
    progress: bool = True,
    model_kwargs: dict | None = None,
    trust_factory: Sequence[str] = (),
) -> dict[str, Any]:
    """Build the model, evaluate, prune with ``recipe``, evaluate, measure, save; return the metrics.

    ``model_spec`` as :func:`secateur.app.models.build_model` reads it (``trust_factory``: the factory names a
    ``saved:`` folder may run). Writes ``out_dir/model/`` (plan.json + model.safetensors, the recipe in its
    metadata) and ``out_dir/metrics.json``.

    Raises:
        ConfigError: unknown ``data``, and what :func:`build_model` and :func:`prune_with_recipe` raise.
    """
    from secateur.app.models import build_model
    from secateur.io import save
    from secateur.train import seed_everything

    t0 = time.perf_counter()
    seed_everything(recipe.seed)
    model = build_model(model_spec, trust_factory=trust_factory, **(model_kwargs or {}))
    train, test, example = load_data(data, recipe, subset)
    dense = {**count_params(model), **count_macs(model, example)}
    if test is not None:
        dense["accuracy"] = evaluate_accuracy(model, test)
    result = prune_with_recipe(model, recipe, train, test, example, progress)
    model = result["model"]
    pruned = {**count_params(model), **count_macs(model, example)}
    if test is not None:
        pruned["accuracy"] = evaluate_accuracy(model, test)
    metrics = {
        "model": model_spec,
        "recipe": recipe.to_dict(),
        "dense": dense,
        "pruned": pruned,
        "sparsity": result["sparsity"],
        "macs_ratio": dense["macs"] / max(pruned["macs"], 1),
        "seconds": time.perf_counter() - t0,
    }
    out = Path(out_dir)
    save(
        model,
        out / "model",
        plan=result["plan"],
        metadata={k: metrics[k] for k in ("model", "sparsity", "recipe")},
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
