"""Run a recipe on a model and its data: the glue behind ``secateur prune`` (and the other commands' setup).

model (any: zoo, Hugging Face folder, saved folder, user factory) → example inputs (given or derived,
:mod:`secateur.app.inputs`) → data (:mod:`secateur.app.datasources`) and the task's metric
(:mod:`secateur.app.metrics`) → dense evaluation → prune as the recipe says (granularity, criterion,
allocation, schedule), fine-tuning classifiers on labelled images when the recipe fine-tunes → BatchNorm
re-estimation → pruned evaluation → counts per example → save (pickle-free, with the inputs, data and
tokenizer recorded so that ``measure``, ``eval`` and ``report`` need no options) and metrics.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateur.analysis import count_macs, count_params
from secateur.app.datasources import TEXT_BATCH, TaskData, load_task_data, load_tokenizer
from secateur.app.inputs import InputField, ModelKind, format_input_spec, make_inputs, model_kind
from secateur.app.metrics import Evaluator, LogitsOf, choose_metric
from secateur.errors import ConfigError
from secateur.pruners.recipe import Recipe

__all__ = [
    "Session",
    "chance_accuracy",
    "check_forward",
    "evaluate_accuracy",
    "finetune_model",
    "folder_bytes",
    "load_data",
    "open_session",
    "prune_with_recipe",
    "run",
    "zoo_for_classes",
]

Echo = Callable[[str], None]


def _quiet(_: str) -> None:
    """An ``echo`` that prints nothing."""


def evaluate_accuracy(model: nn.Module, loader: Any) -> float:
    """Top-1 accuracy (a fraction, 0 to 1) of ``model`` on the ``(x, y)`` batches of ``loader``."""
    from secateur.train import Trainer

    return Trainer(model, loader, epochs=1, progress=False).evaluate(loader)["accuracy"]


@dataclass
class Session:
    """A model ready for a command: its kind, example inputs, data and metric.

    ``fields`` / ``fields_source``: the example input fields and where they came from; ``example``: the
    batch-1 inputs (what MACs are counted on: per example); ``input_name``: the keyword a Hugging Face
    image model takes (``pixel_values``) or None; ``evaluator``: the metric on the held-out data (None
    without data); ``metadata``: a saved folder's recorded metadata.
    """

    spec: str
    model: nn.Module
    kind: ModelKind
    fields: tuple[InputField, ...]
    fields_source: str
    example: Any
    tokenizer: Any
    data: TaskData
    metric: str | None
    evaluator: Evaluator | None
    input_name: str | None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def input_spec(self) -> str:
        """The example inputs as ``--input-spec`` text."""
        return format_input_spec(self.fields)

    def counts(self, model: nn.Module | None = None) -> dict[str, int]:
        """Parameters, non-zero parameters, MACs and sparse MACs of ``model`` (default: this one), MACs
        counted on one example (batch 1)."""
        from secateur._torch import eval_mode

        m = self.model if model is None else model
        with eval_mode(m):
            return {**count_params(m), **count_macs(m, self.example)}


def _input_name(model: nn.Module, fields: Sequence[InputField]) -> str | None:
    """``pixel_values`` (or the one named image input) for a model fed images by keyword, else None."""
    if len(fields) == 1 and fields[0].name and len(fields[0].shape) == 4:
        return fields[0].name
    return None


def open_session(
    spec: str,
    *,
    data: str = "auto",
    input_spec: str | None = None,
    input_shape: str | None = None,
    seq_len: int | None = None,
    subset: int | None = None,
    batch_size: int = 128,
    seed: int = 0,
    calib_blocks: int = TEXT_BATCH,
    model_kwargs: dict[str, Any] | None = None,
    trust_factory: Sequence[str] = (),
    model: nn.Module | None = None,
) -> Session:
    """Build the model of ``spec`` (or take ``model``), its example inputs, data and metric.

    ``data``: a ``--data`` form (:mod:`secateur.app.datasources`) or ``"auto"``: the data a saved folder
    recorded, else :func:`~secateur.app.datasources.default_data`. The input options as
    :func:`~secateur.app.inputs.resolve_fields` reads them (a spec is parsed before the model is built, so a
    bad one fails fast). ``subset``, ``batch_size``, ``seed``, ``calib_blocks``: as
    :func:`~secateur.app.datasources.load_task_data`.

    Raises:
        ConfigError: a bad input spec or shape (the token at fault named), inputs the model cannot take,
            data that does not fit the model; and what :func:`~secateur.app.models.build_model` and
            :func:`~secateur.app.datasources.load_task_data` raise.
    """
    from secateur.app.datasources import default_data, image_normalization
    from secateur.app.inputs import parse_input_spec, resolve_fields
    from secateur.app.models import build_model, model_folder, saved_metadata

    if input_spec:
        parse_input_spec(input_spec)  # fail before the (slow) model build
    meta = saved_metadata(spec)
    built_here = model is None
    if model is None:
        model = build_model(spec, trust_factory=trust_factory, **(model_kwargs or {}))
    fields, source = resolve_fields(
        model,
        input_spec=input_spec,
        input_shape=input_shape,
        seq_len=seq_len,
        recorded=meta.get("input_spec"),
    )
    example = make_inputs(fields, model)
    check_forward(model, example, fields)
    folder = model_folder(spec)
    tokenizer = load_tokenizer(folder) if folder is not None and folder.is_dir() else None
    if data == "auto":
        data = meta.get("data") or default_data(fields, tokenizer is not None)
    normalize = meta.get("normalize") or image_normalization(folder)
    task = load_task_data(
        data,
        fields,
        tokenizer=tokenizer,
        batch_size=batch_size,
        subset=subset,
        seed=seed,
        calib_blocks=calib_blocks,
        normalize=normalize,
    )
    if built_here:
        model = zoo_for_classes(spec, model, task, model_kwargs)
    kind = model_kind(model)
    metric = choose_metric(kind, task.kind)
    input_name = _input_name(model, fields)
    evaluator = Evaluator(metric, task.test, input_name) if metric else None
    return Session(
        spec, model, kind, fields, source, example, tokenizer, task, metric, evaluator, input_name, meta
    )


def zoo_for_classes(
    spec: str, model: nn.Module, task: Any, model_kwargs: dict[str, Any] | None = None
) -> nn.Module:
    """A fresh ``zoo:`` model rebuilt with one output per class of its image data (an image folder with 3
    class sub-folders gives ``num_classes=3``; the zoo's default is 10), unless ``model_kwargs`` sets
    ``num_classes``; ``model`` itself for any other spec, data or a model that already fits. The input
    shape is unchanged (``model_kwargs`` are passed again).

    Raises:
        ConfigError: as :func:`secateur.zoo.create_model`.
    """
    from secateur.app.models import build_model

    kwargs = dict(model_kwargs or {})
    n = len(getattr(task, "classes", None) or [])
    record = getattr(model, "secateur_zoo", None)
    if not spec.startswith("zoo:") or getattr(task, "kind", None) != "images" or n < 1:
        return model
    if "num_classes" in kwargs or not isinstance(record, dict) or record.get("num_classes") == n:
        return model
    return build_model(spec, **kwargs, num_classes=n)


@torch.no_grad()
def check_forward(model: nn.Module, example: Any, fields: Sequence[InputField]) -> None:
    """One forward pass on the example inputs; a failure becomes a ConfigError naming the inputs."""
    from secateur._torch import eval_mode

    try:
        with eval_mode(model):
            if isinstance(example, dict):
                model(**example)
            elif isinstance(example, tuple):
                model(*example)
            else:
                model(example)
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        raise ConfigError(
            f"{type(model).__name__} does not run on the example inputs {format_input_spec(fields)!r} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); give its inputs with "
            "--input-spec NAME:DTYPE[dims],..."
        ) from e


# ---------------------------------------------------------------------------------------------- pruning
class _EpochEval:
    """Trainer callback: after each fine-tuning epoch, print the held-out metric and keep it in ``history``.

    With BatchNorm layers whose statistics are re-estimated after pruning, the line says that this value is
    measured before the re-estimation (the final figure is measured after it)."""

    def __init__(
        self, evaluate: Callable[[nn.Module], float], metric: str, model: nn.Module, note: str
    ) -> None:
        self.evaluate = evaluate
        self.metric = metric
        self.model = model
        self.note = note
        self.history: list[dict[str, Any]] = []

    def on_epoch_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        value = self.evaluate(self.model)
        self.history.append(
            {"epoch": trainer.epoch, self.metric: value, "before_bn_reestimation": bool(self.note)}
        )
        if trainer.progress:
            from tqdm import tqdm

            tqdm.write(
                f"epoch {trainer.epoch}/{trainer.epochs}: held-out {self.metric} {value:.4f}{self.note}"
            )


def _finetune(
    model: nn.Module,
    recipe: Recipe,
    train: Any,
    callbacks: list,
    progress: bool,
    input_name: str | None = None,
) -> Any:
    from secateur.train import Trainer

    ft = recipe.finetune
    trainer = Trainer(
        LogitsOf(model, input_name),
        train,
        None,
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
            "data (--data: text for a language model, images for a vision model; not --data none)"
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


def _as_pairs(data: Any) -> Any:
    """Text batches (``{"input_ids", "attention_mask"}`` dicts) as the ``(x, y)`` pairs the structured
    driver's data collection reads (:func:`secateur.criteria.group.collect`): ``x`` the dict of keyword
    inputs, ``y`` its token ids (unused by activation criteria such as Wanda-sp). Other data unchanged."""
    from collections.abc import Mapping

    if isinstance(data, Mapping):
        return [(dict(data), data["input_ids"])]
    if isinstance(data, list) and data and all(isinstance(b, Mapping) for b in data):
        return [(dict(b), b["input_ids"]) for b in data]
    return data


def _has_bn(model: nn.Module) -> bool:
    bn = nn.modules.batchnorm._BatchNorm
    return any(isinstance(m, bn) and m.track_running_stats for m in model.modules())


def prune_with_recipe(
    model: nn.Module,
    recipe: Recipe,
    train_loader: Any = None,
    test_loader: Any = None,
    example_inputs: Any = None,
    progress: bool = True,
    *,
    evaluate: Callable[[nn.Module], float] | None = None,
    metric: str = "accuracy",
    input_name: str | None = None,
) -> dict[str, Any]:
    """Prune ``model`` as ``recipe`` says, fine-tuning on ``train_loader`` if the recipe fine-tunes.

    The pruner is :meth:`Recipe.build`'s (element masks, N:M masks or the channel driver), stepped by the
    :class:`~secateur.train.Trainer` (or once at step 0 without fine-tuning) and finalised (element masks
    baked, channels compacted); Wanda/SparseGPT at N:M run :func:`secateur.llm.prune_linears` on
    ``recipe.data_batches`` training batches and their masks are baked into the weights (exact zeros), so
    the model saves as it is. Then BatchNorm statistics are re-estimated (``finetune.recalibrate_bn``).

    ``evaluate`` (``model -> metric``, e.g. an :class:`~secateur.app.metrics.Evaluator`): called after each
    fine-tuning epoch, printed as ``held-out <metric>`` and kept in the returned ``history``; the line says
    when it is measured before BatchNorm re-estimation. ``test_loader`` is accepted for older callers and
    used only when ``evaluate`` is None (top-1 accuracy). ``input_name``: the keyword a Hugging Face image
    classifier takes its images by (the Trainer then calls it through :class:`LogitsOf`).

    Returns a dict with ``model`` (the pruned model: a new object after channel compaction), ``plan``
    (structural plan or None), ``sparsity`` (achieved fraction of the recipe's target), ``bn_batches`` and
    ``history`` (one entry per fine-tuning epoch).

    Raises:
        ConfigError: a fine-tuning recipe without training data, channel pruning without example inputs,
            Wanda/SparseGPT without data, and whatever the pruner raises on this model (named).
    """
    from secateur.masks import detach_masks

    out: dict[str, Any] = {"plan": None, "history": []}
    needs_training = recipe.finetune.epochs > 0
    if needs_training and train_loader is None:
        raise ConfigError("recipe fine-tunes (finetune.epochs > 0) but no training data was given")
    steps = recipe.total_steps(len(train_loader)) if train_loader is not None else 1
    data = recipe.data_from(train_loader)
    if evaluate is None and test_loader is not None:
        evaluate = Evaluator("accuracy", test_loader, input_name)
    callbacks: list[Any] = []
    if evaluate is not None and needs_training:
        will_reestimate = recipe.finetune.recalibrate_bn > 0 and _has_bn(model)
        note = " (masks applied; before BatchNorm re-estimation)" if will_reestimate else ""
        callbacks.append(_EpochEval(evaluate, metric, model, note))
    if recipe.is_oneshot_method:
        out["sparsity"] = _prune_oneshot_linears(model, recipe, data)
        if needs_training:
            _finetune(model, recipe, train_loader, callbacks, progress, input_name)
        detach_masks(model)
    else:
        if recipe.granularity == "channel":
            data = _as_pairs(data)
        pruner = recipe.build(model, example_inputs, data, total_steps=steps)
        if needs_training:
            _finetune(model, recipe, train_loader, [pruner, *callbacks], progress, input_name)
        else:
            pruner.step(0)
        out["sparsity"] = pruner.sparsity()
        model = pruner.finalize()
        out["plan"] = getattr(pruner, "plan", None)
    out["bn_batches"] = _recalibrate(model, recipe, train_loader)
    out["model"] = model
    out["history"] = callbacks[0].history if callbacks else []
    return out


def _recalibrate(model: nn.Module, recipe: Recipe, train_loader: Any) -> int:
    """Re-estimate BatchNorm statistics (``finetune.recalibrate_bn`` batches); returns the number used."""
    from secateur.train import recalibrate_bn

    n = recipe.finetune.recalibrate_bn
    if n == 0 or train_loader is None or not _has_bn(model):
        return 0
    return recalibrate_bn(model, train_loader, num_batches=n)



def chance_accuracy(data: Any) -> float | None:
    """Accuracy of guessing, ``1 / classes``, for class-labelled image data (None when unknown)."""
    if data.classes:
        return 1.0 / len(data.classes)
    return 0.1 if data.form == "fashion-mnist" else None


def load_data(data: str, recipe: Recipe, subset: int | None = None) -> tuple[Any, Any, torch.Tensor]:
    """Fashion-MNIST as ``secateur prune --data fashion-mnist`` reads it for a zoo CNN:
    ``(train loader, test loader, example inputs)``.

    ``"fashion-mnist"``: :func:`secateur.data.fashion_mnist_loaders` with the recipe's fine-tuning batch size,
    ``subset`` (first N images of each split) and the recipe's seed (the shuffle of epoch 0 is the same on
    every call); ``"none"``: no loaders. Example inputs: one zero image, ``(1, 1, 28, 28)`` float32. A
    caller reproduces the CLI's calibration batches with ``recipe.data_from(load_data(...)[0])``. Other
    data forms: :func:`secateur.app.datasources.load_task_data`.

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


def folder_bytes(folder: str | Path, names: Sequence[str] | None = None) -> int:
    """Total size in bytes of the regular files directly in ``folder`` (only ``names`` when given: e.g. a
    saved model's weights and plan without its tokenizer)."""
    files = [p for p in Path(folder).iterdir() if p.is_file() and (names is None or p.name in names)]
    return sum(p.stat().st_size for p in files)


def _save_compressed(model: nn.Module, recipe: Recipe, path: Path) -> dict[str, Any]:
    """Write the element-sparse ``model``'s weights in compressed-tensors' bitmask layout
    (:func:`secateur.io.compressed.save_compressed`: ``sparse-24-bitmask`` for a 2:4 recipe, else
    ``sparse-bitmask``); returns ``{"path", "format", "bytes"}``."""
    from secateur.io.compressed import save_compressed

    compression = "sparse-24-bitmask" if recipe.nm == (2, 4) else "sparse-bitmask"
    info = save_compressed(model, path, compression=compression)
    return {"path": str(path), "format": f"compressed-tensors {compression}", "bytes": info["bytes"]}


def _check_recipe_fits(recipe: Recipe, s: Session) -> None:
    """Refuse, before any change, a recipe the data cannot drive."""
    if recipe.finetune.epochs > 0 and s.data.kind != "images":
        raise ConfigError(
            f"recipe {recipe.name or '(file)'} fine-tunes (finetune.epochs {recipe.finetune.epochs}) but "
            f"--data is {s.data.kind}: the command line fine-tunes classifiers on labelled images only. "
            "Write a copy with finetune: {epochs: 0} (secateur recipes NAME > r.yaml) for one-shot pruning"
        )
    if recipe.finetune.epochs > 0 and s.kind.task != "classifier":
        raise ConfigError(
            f"recipe {recipe.name or '(file)'} fine-tunes with cross-entropy on labels, which needs a "
            f"classifier; {type(s.model).__name__} is a {s.kind.label}"
        )
    if recipe.granularity != "channel":
        from secateur.errors import ScopeError

        try:
            recipe.to_scope().resolve(s.model)
        except ScopeError as e:
            sc = recipe.scope
            raise ConfigError(
                f"recipe {recipe.name or '(file)'} does not suit {type(s.model).__name__}: {e}"
                + (" after exclude_first/exclude_last" if sc.exclude_first or sc.exclude_last else "")
                + "; `secateur recipes` lists the model kinds each recipe suits (or edit scope.types / "
                "scope.exclude_last in a copy: secateur recipes NAME > r.yaml)"
            ) from e


def run(
    model_spec: str,
    recipe: Recipe,
    out_dir: str | Path,
    data: str = "auto",
    subset: int | None = None,
    progress: bool = True,
    model_kwargs: dict | None = None,
    trust_factory: Sequence[str] = (),
    *,
    input_spec: str | None = None,
    input_shape: str | None = None,
    seq_len: int | None = None,
    echo: Echo | None = None,
) -> dict[str, Any]:
    """Build the model, evaluate, prune with ``recipe``, evaluate, count, save; return the metrics.

    ``model_spec`` as :func:`secateur.app.models.build_model` reads it (``trust_factory``: the factory names
    a ``saved:`` folder may run); ``data``, the input options and ``subset`` as :func:`open_session` reads
    them. ``echo`` receives one line per stage (default: nothing). Writes ``out_dir/model/`` (plan.json +
    model.safetensors with the recipe, input spec, data and normalisation in its metadata, plus the
    tokenizer for a text model), ``out_dir/metrics.json`` and, for element and N:M recipes (zeros kept in
    place, which safetensors stores densely), ``out_dir/model.compressed.safetensors`` in compressed-tensors'
    bitmask layout (:mod:`secateur.io.compressed`). Nothing is written when anything fails
    before the save.

    Returns:
        ``{"model", "recipe", "kind", "data", "input_spec", "inputs_from", "metric", "macs_per": "example",
        "dense", "pruned", "sparsity", "macs_ratio", "bn_batches", "history", "saved", "saved_bytes",
        "compressed" (element and N:M recipes: ``{"path", "format", "bytes"}`` of
        ``out_dir/model.compressed.safetensors``), "seconds"}``; ``dense``/``pruned`` hold params,
        nonzero_params, macs, sparse_macs (per example) and the metric under its name (``accuracy``,
        ``perplexity`` or ``cosine``).

    Raises:
        ConfigError: a recipe the data cannot drive (fine-tuning on text), and what :func:`open_session`
            and :func:`prune_with_recipe` raise.
    """
    from secateur.io import save
    from secateur.train import seed_everything

    say = echo or _quiet
    t0 = time.perf_counter()
    seed_everything(recipe.seed)
    s = open_session(
        model_spec,
        data=data,
        input_spec=input_spec,
        input_shape=input_shape,
        seq_len=seq_len,
        subset=subset,
        batch_size=recipe.finetune.batch_size,
        seed=recipe.seed,
        calib_blocks=recipe.data_batches * TEXT_BATCH,
        model_kwargs=model_kwargs,
        trust_factory=trust_factory,
    )
    _check_recipe_fits(recipe, s)
    say(f"model: {type(s.model).__name__} ({s.kind.label}); inputs {s.input_spec} ({s.fields_source})")
    say(f"data: {s.data.description}")
    dense = s.counts()
    if s.evaluator is not None:
        if s.metric == "cosine":
            s.evaluator.set_reference(s.model)
        dense[s.metric] = s.evaluator(s.model)
        say(f"dense {s.metric}: {dense[s.metric]:.4f}")
    say(f"pruning with recipe {recipe.name or '(file)'} ...")
    result = prune_with_recipe(
        s.model,
        recipe,
        s.data.train,
        None,
        s.example,
        progress,
        evaluate=s.evaluator,
        metric=s.metric or "accuracy",
        input_name=s.input_name,
    )
    model = result["model"]
    pruned = s.counts(model)
    if s.evaluator is not None:
        pruned[s.metric] = s.evaluator(model)
    metrics = {
        "model": model_spec,
        "recipe": recipe.to_dict(),
        "kind": s.kind.label,
        "data": s.data.description,
        "input_spec": s.input_spec,
        "inputs_from": s.fields_source,
        "metric": s.metric,
        "macs_per": "example",
        "chance": chance_accuracy(s.data),
        "dense": dense,
        "pruned": pruned,
        "sparsity": result["sparsity"],
        "macs_ratio": dense["macs"] / max(pruned["macs"], 1),
        "bn_batches": result["bn_batches"],
        "history": result["history"],
    }
    out = Path(out_dir)
    meta = {k: metrics[k] for k in ("model", "sparsity", "recipe", "input_spec", "kind", "metric")}
    meta["data"] = s.data.form
    if s.data.normalize:
        meta["normalize"] = s.data.normalize
    if model_spec.startswith("saved:") and s.metadata.get("model"):
        meta["dense_model"] = s.metadata.get("dense_model", s.metadata["model"])
    save(model, out / "model", plan=result["plan"], metadata=meta)
    if s.tokenizer is not None:
        s.tokenizer.save_pretrained(str(out / "model"))
    metrics["saved"] = str(out / "model")
    metrics["saved_bytes"] = folder_bytes(out / "model", ("model.safetensors", "plan.json"))
    if recipe.granularity != "channel":  # zeros in place: safetensors stores them; a bitmask layout does not
        metrics["compressed"] = _save_compressed(model, recipe, out / "model.compressed.safetensors")
    metrics["seconds"] = time.perf_counter() - t0
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def finetune_model(
    model_spec: str,
    *,
    data: str = "auto",
    input_spec: str | None = None,
    input_shape: str | None = None,
    seq_len: int | None = None,
    epochs: int = 1,
    lr: float = 0.05,
    batch_size: int = 128,
    subset: int | None = None,
    seed: int = 0,
    out_dir: str | Path = "runs/finetune",
    progress: bool = True,
    model_kwargs: dict | None = None,
    trust_factory: Sequence[str] = (),
    user_factory: Sequence[str] = (),
) -> dict[str, Any]:
    """Train a classifier on labelled images (``secateur finetune``) and save it to ``out_dir/model``.

    :func:`secateur.train.seed_everything` (``seed``, deterministic algorithms) runs before the model is
    built, and the training shuffle is seeded with ``seed``, so two runs with the same arguments give
    bit-identical weights. Element masks of a pruned model are kept (a saved folder's plan is saved again).
    The saved folder records the inputs and the data, as :func:`run` does; it is loaded back once
    (``user_factory`` + ``trust_factory``: the factory names it may run) so a folder that cannot reload
    fails now.

    Returns:
        ``{"accuracy" (held-out top-1, fraction), "saved", "seed", "epochs"}``.

    Raises:
        ConfigError: data that is not labelled images, a model that is not a classifier, and what
            :func:`open_session` and :class:`~secateur.train.Trainer` raise.
    """
    from secateur.io import load, save
    from secateur.train import Trainer, seed_everything

    seed_everything(seed)
    s = open_session(
        model_spec,
        data=data,
        input_spec=input_spec,
        input_shape=input_shape,
        seq_len=seq_len,
        subset=subset,
        batch_size=batch_size,
        seed=seed,
        model_kwargs=model_kwargs,
        trust_factory=trust_factory,
    )
    if s.data.kind != "images" or s.evaluator is None:
        raise ConfigError(
            "finetune trains classifiers on labelled images; "
            f"--data gives {s.data.kind} ({s.data.description})"
        )
    if s.kind.task != "classifier":
        raise ConfigError(f"finetune trains classifiers; {type(s.model).__name__} is a {s.kind.label}")
    plan = None
    if model_spec.startswith("saved:"):  # open_session loaded it; its plan is saved again with it
        from secateur.io.validate import read_plan_file

        plan = read_plan_file(Path(model_spec[len("saved:") :])).get("plan")
    trainer = Trainer(
        LogitsOf(s.model, s.input_name), s.data.train, s.data.test, epochs=epochs, lr=lr, progress=progress
    )
    trainer.fit()
    acc = s.evaluator(s.model)
    meta: dict[str, Any] = {
        "model": model_spec,
        "accuracy": acc,
        "epochs": epochs,
        "seed": seed,
        "input_spec": s.input_spec,
        "kind": s.kind.label,
        "data": s.data.form,
    }
    if s.data.normalize:
        meta["normalize"] = s.data.normalize
    folder = Path(out_dir) / "model"
    save(s.model, folder, plan=plan, metadata=meta)
    load(folder, trust_factory=list(user_factory) + list(trust_factory))
    return {"accuracy": acc, "saved": str(folder), "seed": seed, "epochs": epochs}
