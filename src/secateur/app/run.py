"""Run a recipe on a model and a dataset: the glue behind ``secateur prune``.

dense evaluation → prune (as the recipe's granularity, criterion, allocation and schedule say)
while fine-tuning → pruned evaluation → measurement → save (pickle-free) and metrics.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateur.analysis import count_macs, count_params
from secateur.app.recipe import Recipe, steps_for
from secateur.errors import ConfigError
from secateur.scope import Scope

_TYPES = {"Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d, "Linear": nn.Linear}


def scope_of(recipe: Recipe) -> Scope:
    """The :class:`Scope` a recipe describes."""
    s = recipe.scope
    return Scope(
        types=tuple(_TYPES[t] for t in s.types),
        include=s.include,
        exclude=tuple(s.exclude) + tuple(recipe.protect),
        exclude_first=s.exclude_first,
        exclude_last=s.exclude_last,
    )


def _evaluate(model: nn.Module, loader: Any) -> float:
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


def _nm_prune(model: nn.Module, recipe: Recipe) -> None:
    """Magnitude N:M masks on every scoped weight (flattened to (out, in·k·k) rows)."""
    from secateur.masks import set_mask
    from secateur.masks.patterns import nm_mask

    for t in scope_of(recipe).resolve(model):
        w = getattr(t.module, t.param_name).detach()
        keep = nm_mask(w.abs().reshape(w.shape[0], -1), recipe.n, recipe.m, layer=t.name).reshape(w.shape)
        set_mask(t.module, keep, t.param_name)


def prune_with_recipe(
    model: nn.Module,
    recipe: Recipe,
    train_loader: Any = None,
    test_loader: Any = None,
    example_inputs: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Prune ``model`` in place as ``recipe`` says, fine-tuning on ``train_loader`` if given.

    Returns a dict with ``plan`` (structural plan or None), accuracies (fractions) when a test
    loader is given, and the achieved sparsity. Raises ConfigError for combinations this runner
    does not support (named).
    """
    from secateur.masks import detach_masks

    out: dict[str, Any] = {"plan": None}
    needs_training = recipe.finetune.epochs > 0
    if needs_training and train_loader is None:
        raise ConfigError("recipe fine-tunes (finetune.epochs > 0) but no training data was given")
    steps = steps_for(recipe, len(train_loader)) if train_loader is not None else 1
    schedule = recipe.schedule.build(steps)
    data_batch = next(iter(train_loader)) if train_loader is not None else None
    if recipe.granularity == "element":
        from secateur.pruners.element import Pruner

        pruner = Pruner(
            model,
            schedule,
            criterion=recipe.criterion,
            allocation=recipe.allocation,
            scope=scope_of(recipe),
            data=data_batch,
            example_inputs=example_inputs,
            criterion_kwargs=dict(recipe.criterion_kwargs),
        )
        if needs_training:
            _finetune(model, recipe, train_loader, test_loader, [pruner], progress)
        else:
            pruner.step(0)
        out["sparsity"] = pruner.sparsity()
        detach_masks(model)
    elif recipe.granularity == "n:m":
        if recipe.criterion != "magnitude":
            raise ConfigError(
                f"granularity 'n:m' with criterion {recipe.criterion!r} on a vision model: use "
                "'magnitude' here, "
                "or secateur.llm.prune_oneshot for Wanda/SparseGPT on a transformer with calibration text"
            )
        _nm_prune(model, recipe)
        if needs_training:
            _finetune(model, recipe, train_loader, test_loader, [], progress)
        out["sparsity"] = 1.0 - recipe.n / recipe.m
        detach_masks(model)
    else:
        if example_inputs is None:
            raise ConfigError("granularity 'channel' needs example inputs to trace the dependency graph")
        from secateur.pruners.channel import ChannelPruner

        if recipe.allocation not in ("global", "uniform"):
            raise ConfigError(
                f"allocation {recipe.allocation!r} is element-wise; "
                "channel pruning takes 'global' or 'uniform'"
            )
        was_training = model.training
        model.eval()
        pruner = ChannelPruner(
            model,
            example_inputs,
            schedule=schedule,
            criterion=recipe.criterion,
            allocation=recipe.allocation,
            target=recipe.target,
            protect=tuple(recipe.protect),
            round_to=recipe.round_to,
            data=data_batch,
            criterion_kwargs=dict(recipe.criterion_kwargs),
        )
        model.train(was_training)
        if needs_training:
            _finetune(model, recipe, train_loader, test_loader, [pruner], progress)
        else:
            pruner.step(0)
        out["sparsity"] = pruner.sparsity()
        model = pruner.finalize()
        out["plan"] = pruner.plan
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


def run(
    model_spec: str,
    recipe: Recipe,
    out_dir: str | Path,
    data: str = "fashion-mnist",
    subset: int | None = None,
    progress: bool = True,
    model_kwargs: dict | None = None,
) -> dict[str, Any]:
    """Build the model, evaluate, prune with ``recipe``, evaluate, measure, save; return the metrics.

    Writes ``out_dir/model/`` (plan.json + model.safetensors) and ``out_dir/metrics.json``.
    """
    from secateur.app.models import build_model
    from secateur.io import save
    from secateur.train import seed_everything

    t0 = time.perf_counter()
    seed_everything(recipe.seed)
    model = build_model(model_spec, **(model_kwargs or {}))
    train = test = None
    if data == "fashion-mnist":
        from secateur.data import fashion_mnist_loaders

        train, test = fashion_mnist_loaders(
            batch_size=recipe.finetune.batch_size, subset=subset, seed=recipe.seed
        )
        example = torch.zeros(1, 1, 28, 28)
    elif data == "none":
        example = torch.zeros(1, 1, 28, 28)
    else:
        raise ConfigError(f"unknown data {data!r}; allowed: 'fashion-mnist', 'none'")
    dense = {**count_params(model), **count_macs(model, example)}
    if test is not None:
        dense["accuracy"] = _evaluate(model, test)
    result = prune_with_recipe(model, recipe, train, test, example, progress)
    model = result["model"]
    pruned = {**count_params(model), **count_macs(model, example)}
    if test is not None:
        pruned["accuracy"] = _evaluate(model, test)
    metrics = {
        "model": model_spec,
        "recipe": recipe.model_dump(mode="json"),
        "dense": dense,
        "pruned": pruned,
        "sparsity": result["sparsity"],
        "macs_ratio": dense["macs"] / max(pruned["macs"], 1),
        "seconds": time.perf_counter() - t0,
    }
    out = Path(out_dir)
    save(model, out / "model", plan=result["plan"], metadata={k: metrics[k] for k in ("model", "sparsity")})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
