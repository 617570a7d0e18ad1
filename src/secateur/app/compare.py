"""``secateur compare``: one model and one budget pruned by secateur and by peer libraries, side by side.

For each tool a fresh copy of the same starting weights is pruned, fine-tuned with the identical budget
(the same optimizer steps, learning rate schedule and batches, in the same order) and evaluated on the same
test images; then parameters, non-zero parameters, MACs, latency (all models timed interleaved in one run,
median and IQR) and the wall time of the pruning step are measured. The tools:

* ``secateur``: channel mode uses :class:`~secateur.pruners.channel.ChannelPruner` with the L1 filter
  norm (channels physically removed through the dependency graph); element mode uses the global magnitude
  :class:`~secateur.pruners.element.Pruner` over every conv and linear weight.
* ``torch_pruning`` (Torch-Pruning, the optional ``peers`` extra): ``MagnitudePruner`` with L1 importance,
  the classifier in ``ignored_layers`` (secateur never prunes the model's outputs either). For a channel
  target its per-layer ratio is the same fraction; for a params/MACs target the ratio is scanned on a grid
  and the one closest to secateur's target is kept. It has no element-wise mode.
* ``torch_ao``: ``torch.ao.pruning.WeightNormSparsifier`` with 1x1 blocks (layer-wise magnitude; conv
  weights are scored as ``(C_out, C_in*k*k)`` rows). It masks weights and removes no channel, so it is
  "not applicable" in channel mode.

A peer that is not installed gets a row saying so instead of an error.
"""

from __future__ import annotations

import importlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateur.analysis import count_macs, count_params
from secateur.data.loader import StepLoader
from secateur.errors import ConfigError

MODES = ("channel", "element")
TARGETS = ("channels", "params", "macs")
TOOLS = ("secateur", "torch_pruning", "torch_ao")
LABELS = {
    "dense": "dense (unpruned)",
    "secateur": "secateur",
    "torch_pruning": "Torch-Pruning",
    "torch_ao": "torch.ao.pruning",
}
METHODS = {
    ("channel", "secateur"): "ChannelPruner, L1 filter norm",
    ("channel", "torch_pruning"): "MagnitudePruner, L1 importance",
    ("channel", "torch_ao"): "-",
    ("element", "secateur"): "Pruner, global magnitude",
    ("element", "torch_pruning"): "-",
    ("element", "torch_ao"): "WeightNormSparsifier 1x1, layer-wise L2",
}
INSTALL_HINT = {"torch_pruning": "pip install torch-pruning  (or: pip install 'secateur[peers]')"}
EXAMPLE_SHAPE = (1, 1, 28, 28)  # one Fashion-MNIST image
#: Least optimizer steps of the default dense training of a fresh model (one epoch of the full training set
#: is 469 steps at batch 128).
DENSE_MIN_STEPS = 500


def _import_torch_pruning() -> Any:
    """The ``torch_pruning`` module, or None when it is not installed."""
    try:
        return importlib.import_module("torch_pruning")
    except ImportError:
        return None


def _version(dist: str) -> str | None:
    """The installed version of the distribution ``dist``, or None."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _import_torch_ao() -> Any:
    """``torch.ao.pruning``, or None when this PyTorch build lacks it."""
    try:
        return importlib.import_module("torch.ao.pruning")
    except ImportError:
        return None


def _prunable_weights(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]


def _weight_sparsity(model: nn.Module) -> float:
    """Fraction (0-1) of conv and linear weights that are exactly zero."""
    total = zeros = 0
    for _, m in _prunable_weights(model):
        w = m.weight.detach()
        total += w.numel()
        zeros += int((w == 0).sum())
    return zeros / max(total, 1)


def _classifier(model: nn.Module) -> list[nn.Module]:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


@torch.no_grad()
def _accuracy(model: nn.Module, loader: Any) -> float:
    """Top-1 accuracy (fraction) of ``model`` on ``loader``; the model's train/eval mode is restored."""
    was = model.training
    model.eval()
    correct = seen = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        seen += int(y.numel())
    model.train(was)
    return correct / max(seen, 1)


# ------------------------------------------------------------------------------------------ pruning
def _secateur_channel(model: nn.Module, example: torch.Tensor, sparsity: float, target: str) -> nn.Module:
    from secateur.pruners.channel import ChannelPruner

    model.eval()
    cp = ChannelPruner(model, example, schedule=sparsity, criterion="l1", allocation="uniform", target=target)
    cp.prune_to(sparsity)
    return cp.finalize()


def _tp_apply(tp: Any, model: nn.Module, example: torch.Tensor, ratio: float) -> nn.Module:
    model.eval()
    pruner = tp.pruner.MagnitudePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=_classifier(model),
    )
    pruner.step()
    return model


def _tp_ratio(
    tp: Any, model: nn.Module, example: torch.Tensor, goal: float, measure: Callable[[nn.Module], float]
) -> float:
    """The channel ratio on a 0.02 grid whose remaining cost (``measure``) is closest to ``goal``
    on a log scale. A scan rather than a bisection: Torch-Pruning rounds channel counts and skips
    layers a ratio would empty, so on small nets the cost is not monotone in the ratio."""
    from secateur.masks import copy_model

    best, best_err = 0.0, math.inf
    for k in range(1, 50):
        ratio = k * 0.02
        cost = measure(_tp_apply(tp, copy_model(model), example, ratio))
        err = abs(math.log(max(cost, 1.0) / max(goal, 1.0)))
        if err < best_err:
            best, best_err = ratio, err
        if cost < goal / 1.5:
            break
    return best


def _tp_channel(
    tp: Any, model: nn.Module, example: torch.Tensor, sparsity: float, target: str
) -> tuple[nn.Module, float]:
    if target == "channels":
        ratio = sparsity
    else:

        def measure(m: nn.Module) -> float:
            if target == "macs":
                return float(count_macs(m, example)["macs"])
            return float(count_params(m)["params"])

        ratio = _tp_ratio(tp, model, example, (1.0 - sparsity) * measure(model), measure)
    return _tp_apply(tp, model, example, ratio), ratio


def conv_row_weight_norm_sparsifier(sparsity: float, ao: Any = None) -> Any:
    """``torch.ao.pruning.WeightNormSparsifier`` (1x1 blocks) that also takes conv weights.

    The stock sparsifier reads the last two dims of a weight as its 2-D grid and fails on 4-D conv
    weights; this subclass only scores them as ``(C_out, -1)`` rows. ``sparsity`` is a fraction per
    layer. Raises ImportError when this PyTorch build has no ``torch.ao.pruning``.
    """
    ao = ao or importlib.import_module("torch.ao.pruning")

    class _RowView(ao.WeightNormSparsifier):
        def update_mask(self, module, tensor_name, sparsity_level, sparse_block_shape, zeros_per_block, **kw):  # noqa: ANN001
            mask = getattr(module.parametrizations, tensor_name)[0].mask
            w = getattr(module, tensor_name)
            rows = self.norm_fn(w).reshape(w.shape[0], -1)
            m2 = self._make_tensor_mask(
                data=rows,
                input_shape=rows.shape,
                sparsity_level=sparsity_level,
                sparse_block_shape=sparse_block_shape,
            )
            mask.data = m2.reshape(mask.shape).to(mask.dtype)

    return _RowView(sparsity_level=sparsity, sparse_block_shape=(1, 1), zeros_per_block=1)


def _torch_ao_element(ao: Any, model: nn.Module, sparsity: float) -> Callable[[], Any]:
    """Mask ``model`` with :func:`conv_row_weight_norm_sparsifier` at ``sparsity`` per layer; returns the
    function that bakes the masks (``squash_mask``)."""
    sp = conv_row_weight_norm_sparsifier(sparsity, ao)
    sp.prepare(model, [{"tensor_fqn": f"{n}.weight"} for n, _ in _prunable_weights(model)])
    sp.step()
    return sp.squash_mask


def _secateur_element(model: nn.Module, sparsity: float) -> Callable[[], Any]:
    from secateur.pruners.element import Pruner

    pruner = Pruner(model, sparsity, criterion="magnitude", allocation="global")
    pruner.prune_to(sparsity)
    return pruner.finalize


# ------------------------------------------------------------------------------------------ compare
def compare(
    model_spec: str,
    *,
    mode: str = "channel",
    sparsity: float = 0.5,
    target: str = "channels",
    epochs: int = 1,
    steps: int | None = None,
    lr: float = 0.01,
    batch_size: int = 128,
    subset: int | None = None,
    seed: int = 0,
    latency_batch: int = 32,
    latency_repeats: int = 20,
    out_dir: str | Path = "runs/compare",
    model_kwargs: dict[str, Any] | None = None,
    tools: tuple[str, ...] = TOOLS,
    progress: bool = False,
    trust_factory: tuple[str, ...] = (),
    dense_epochs: int | None = None,
    dense_lr: float = 0.05,
) -> dict[str, Any]:
    """Prune ``model_spec`` with every tool at one budget, fine-tune alike, measure; write table, JSON, plot.

    Args:
        model_spec: ``zoo:NAME``, ``saved:PATH`` (e.g. a trained model from ``secateur finetune``), ...
            (see :func:`secateur.app.models.build_model`); it must take ``(N, 1, 28, 28)`` Fashion-MNIST
            input.
        mode: ``"channel"`` (structures physically removed) or ``"element"`` (individual weights zeroed).
        sparsity: the fraction (0-1) to remove. Channel mode: a fraction of ``target``; element mode: of all
            conv and linear weights.
        target: channel mode only: ``"channels"`` (prunable channels; Torch-Pruning gets the same per-layer
            ratio), ``"params"`` or ``"macs"`` (Torch-Pruning's ratio is scanned to come closest).
        epochs, steps: fine-tuning budget: ``steps`` optimizer steps if given, else ``epochs`` passes over
            the training subset; 0 skips fine-tuning. The same for every tool.
        lr: peak learning rate (SGD, momentum 0.9, weight decay 5e-4, cosine over the budget).
        batch_size: training batch size. subset: use the first N images of each split. seed: seeds the
            model build, the shuffle (the same batches for every tool) and every fine-tuning run.
        latency_batch: batch size for latency. latency_repeats: timing rounds (0: no latency).
        out_dir: writes ``compare.md``, ``compare.json`` and ``compare.png`` there.
        model_kwargs: keyword arguments for the model factory. tools: which tools to run (subset of TOOLS).
        progress: show fine-tuning progress bars.
        trust_factory: user factory names a ``saved:`` folder may run (see :func:`secateur.load`).
        dense_epochs: epochs of training of the dense model before anything is pruned (SGD, cosine from
            ``dense_lr``, the same seed), so that the comparison starts from a trained network; default
            (None): for a freshly built model (``zoo:``, ``hf:``, a factory) one epoch or
            :data:`DENSE_MIN_STEPS` optimizer steps, whichever is more (a ``subset`` run still trains
            enough to leave chance), for ``saved:`` none (trained already, e.g. by ``secateur finetune``).
            A dense accuracy within 10 points of chance adds a warning to the result and the table.

    Returns:
        ``{"config", "dense", "rows", "files"}``: ``dense`` and each of ``rows`` (one per tool) hold
        ``status`` ("ok", "not installed", "not applicable", "failed"), ``reason``, accuracy (fraction),
        ``params``, ``nonzero_params``, ``macs`` (MACs of one 28x28 image), ``sparse_macs``,
        ``weight_sparsity`` (fraction of conv/linear weights that are zero), ``mac_reduction`` and
        ``sparse_mac_reduction`` (dense MACs / pruned MACs or sparse MACs), ``latency`` (ms per batch:
        median, IQR), ``prune_s`` and ``finetune_s`` (seconds); ``warnings``: lines for the reader (a dense
        model near chance, a peer that is not installed).

    Raises:
        ConfigError: bad mode / target / sparsity / budget / tool, or an unknown model spec.
        DataError: Fashion-MNIST cannot be found.
    """
    from secateur.app.models import build_model
    from secateur.data import fashion_mnist_loaders
    from secateur.masks import copy_model
    from secateur.train import Trainer, seed_everything

    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    if target not in TARGETS:
        raise ConfigError(f"target must be one of {TARGETS}, got {target!r}")
    if not (isinstance(sparsity, (int, float)) and 0.0 < sparsity < 1.0):
        raise ConfigError(f"sparsity must be a fraction in (0, 1), got {sparsity!r}")
    auto_dense = dense_epochs is None
    if dense_epochs is None:
        dense_epochs = 0 if model_spec.startswith("saved:") else 1
    if epochs < 0 or dense_epochs < 0 or (steps is not None and steps < 0):
        raise ConfigError(
            f"epochs, dense_epochs and steps must be >= 0, got {epochs!r}, {dense_epochs!r}, {steps!r}"
        )
    if latency_batch < 1 or latency_repeats < 0:
        raise ConfigError(
            f"latency_batch must be >= 1 and latency_repeats >= 0, got {latency_batch}, {latency_repeats}"
        )
    bad = [t for t in tools if t not in TOOLS]
    if bad or not tools:
        raise ConfigError(f"tools must be a non-empty subset of {TOOLS}, got {tuple(tools)!r}")
    if mode == "element" and target != "channels":
        raise ConfigError("target applies to channel mode only; element mode prunes a fraction of weights")

    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    dense = build_model(model_spec, trust_factory=trust_factory, **(model_kwargs or {}))
    train, test = fashion_mnist_loaders(batch_size=batch_size, subset=subset, seed=seed)
    example = torch.zeros(EXAMPLE_SHAPE)
    dense_steps = dense_epochs * len(train)
    if auto_dense and dense_epochs:
        dense_steps = max(dense_steps, DENSE_MIN_STEPS)
    dense_training = {"steps": dense_steps, "lr": dense_lr, "seconds": 0.0}
    if dense_steps > 0:
        t0 = time.perf_counter()
        dense_loader = StepLoader(train, dense_steps)
        Trainer(dense, dense_loader, epochs=1, lr=dense_lr, progress=progress, log_every=0).fit()
        dense_training["seconds"] = time.perf_counter() - t0
    n_steps = steps if steps is not None else epochs * len(train)
    budget = {
        "steps": n_steps,
        "batch_size": batch_size,
        "lr": lr,
        "schedule": "cosine",
        "optimizer": "sgd, momentum 0.9, weight decay 5e-4",
        "seed": seed,
        "train_images": train.num_examples,
    }

    def measure(model: nn.Module) -> dict[str, Any]:
        return {
            **count_params(model),
            **count_macs(model, example),
            "weight_sparsity": _weight_sparsity(model),
        }

    dense_row: dict[str, Any] = {
        "tool": "dense",
        "label": LABELS["dense"],
        "method": "-",
        "status": "ok",
        "reason": "",
        **measure(dense),
        "accuracy": _accuracy(dense, test),
    }
    warnings_: list[str] = []
    chance = 1.0 / 10
    if dense_row["accuracy"] < chance + 0.1:
        warnings_.append(
            f"the dense model's accuracy {dense_row['accuracy']:.3f} is near chance ({chance:.2f}): pruned "
            "accuracies say little; train it first (--dense-epochs N, or secateur finetune and "
            "--model saved:RUN/model)"
        )
    models: dict[str, nn.Module] = {"dense": dense}
    rows: list[dict[str, Any]] = []
    tp, ao = _import_torch_pruning(), _import_torch_ao()
    for tool in tools:
        row: dict[str, Any] = {
            "tool": tool,
            "label": LABELS[tool],
            "method": METHODS[(mode, tool)],
            "status": "ok",
            "reason": "",
            "finetune": budget,
        }
        rows.append(row)
        if tool == "torch_pruning" and tp is None:
            row.update(status="not installed", reason=INSTALL_HINT[tool])
            warnings_.append(
                f"Torch-Pruning is not installed, so nothing is compared with it: {INSTALL_HINT[tool]}"
            )
            continue
        if tool == "torch_pruning" and mode == "element":
            row.update(
                status="not applicable", reason="Torch-Pruning removes structures; no element-wise mode"
            )
            continue
        if tool == "torch_ao" and ao is None:
            row.update(status="not installed", reason="this PyTorch build has no torch.ao.pruning")
            continue
        if tool == "torch_ao" and mode == "channel":
            row.update(
                status="not applicable",
                reason="torch.ao.pruning only masks weights; its stable API removes no channel",
            )
            continue
        model = copy_model(dense)
        seed_everything(seed)
        bake: Callable[[], Any] | None = None
        t0 = time.perf_counter()
        try:
            if mode == "channel" and tool == "secateur":
                model = _secateur_channel(model, example, sparsity, target)
            elif mode == "channel":
                model, row["tp_ratio"] = _tp_channel(tp, model, example, sparsity, target)
            elif tool == "secateur":
                bake = _secateur_element(model, sparsity)
            else:
                bake = _torch_ao_element(ao, model, sparsity)
        except Exception as e:  # a peer failing on this model is a result, not a crash
            if tool == "secateur":
                raise
            row.update(status="failed", reason=f"{type(e).__name__}: {e}")
            continue
        row["prune_s"] = time.perf_counter() - t0
        row["accuracy_oneshot"] = _accuracy(model, test)
        t0 = time.perf_counter()
        if n_steps > 0:
            seed_everything(seed)
            base, _ = fashion_mnist_loaders(batch_size=batch_size, subset=subset, seed=seed)
            Trainer(
                model,
                StepLoader(base, n_steps),
                epochs=1,
                lr=lr,
                weight_decay=5e-4,
                progress=progress,
                log_every=0,
            ).fit()
        row["finetune_s"] = time.perf_counter() - t0
        if bake is not None:
            bake()
        model.eval()
        row.update(measure(model))
        row["accuracy"] = _accuracy(model, test)
        row["mac_reduction"] = dense_row["macs"] / max(row["macs"], 1)
        row["sparse_mac_reduction"] = dense_row["macs"] / max(row["sparse_macs"], 1)
        row["param_reduction"] = dense_row["params"] / max(row["nonzero_params"], 1)
        models[tool] = model
    dense_row["mac_reduction"] = dense_row["param_reduction"] = 1.0
    dense_row["sparse_mac_reduction"] = dense_row["macs"] / max(dense_row["sparse_macs"], 1)

    if latency_repeats > 0:
        from secateur.analysis.latency import compare_callables

        x = torch.zeros(latency_batch, *EXAMPLE_SHAPE[1:])

        def forward(m: nn.Module) -> Callable[[], Any]:
            m.eval()

            def fn() -> Any:
                with torch.inference_mode():
                    return m(x)

            return fn

        lat = compare_callables(
            {k: forward(m) for k, m in models.items()}, repeats=latency_repeats, warmup=2, block_ms=5.0
        )
        for r in [dense_row, *rows]:
            if r["tool"] in lat:
                r["latency"] = {**lat[r["tool"]], "batch_size": latency_batch}

    config = {
        "model": model_spec,
        "model_kwargs": model_kwargs or {},
        "mode": mode,
        "sparsity": sparsity,
        "target": target if mode == "channel" else "weights",
        "subset": subset,
        "test_images": test.num_examples,
        "finetune": budget,
        "latency_batch": latency_batch,
        "latency_repeats": latency_repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_pruning": _version("torch-pruning") if tp is not None else None,
        "dense_training": dense_training,
    }
    result: dict[str, Any] = {"config": config, "dense": dense_row, "rows": rows, "warnings": warnings_}
    files = {"markdown": out / "compare.md", "json": out / "compare.json", "plot": out / "compare.png"}
    result["files"] = {k: str(v) for k, v in files.items()}
    files["markdown"].write_text(markdown(result) + "\n")
    plot(result, files["plot"])
    result["seconds"] = time.perf_counter() - t_start
    files["json"].write_text(json.dumps(result, indent=2, default=str))
    return result


# ------------------------------------------------------------------------------------------ output
def _fmt_int(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) else "—"


def markdown(result: dict[str, Any]) -> str:
    """The comparison as a Markdown table (accuracies in %, latency in ms per batch, prune time in s)."""
    cfg = result["config"]
    ft = cfg["finetune"]
    mode = cfg["mode"]
    red_key, red_head = (
        ("mac_reduction", "MAC reduction")
        if mode == "channel"
        else ("sparse_mac_reduction", "sparse-MAC reduction")
    )
    what = f"{cfg['sparsity']:.0%} of {cfg['target']}"
    head = [
        f"# secateur compare: {cfg['model']}, {mode} pruning, {what}",
        "",
        f"Fine-tuning, identical for every tool: {ft['steps']} SGD steps of batch {ft['batch_size']} "
        f"(momentum 0.9, weight decay 5e-4, cosine from lr {ft['lr']}), the same batches (seed "
        f"{ft['seed']}). Accuracy on {cfg['test_images']} Fashion-MNIST test images. MACs of one 28x28 "
        f"image. Latency: ms per batch of {cfg['latency_batch']} on CPU ({cfg['threads']} "
        f"thread{'s' if cfg['threads'] != 1 else ''}), all models interleaved in one run, median (IQR).",
        "",
        "| tool | method | status | accuracy % (one-shot) | params | non-zero params | MACs "
        f"| weight sparsity | {red_head} | latency ms | prune s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    dt = cfg.get("dense_training") or {}
    if dt.get("steps"):
        head.insert(
            3,
            f"The dense model was trained first for {dt['steps']} SGD steps (cosine from lr {dt['lr']}); "
            "every tool starts from it.",
        )
        head.insert(4, "")
    for w in result.get("warnings") or []:
        head.insert(2, f"**Warning:** {w}")
        head.insert(3, "")
    lines = list(head)
    for r in [result["dense"], *result["rows"]]:
        if r["status"] != "ok":
            status = f"{r['status']}: {r['reason']}"
            lines.append(f"| {r['label']} | {r['method']} | {status} |" + " — |" * 8)
            continue
        acc = f"{100 * r['accuracy']:.2f}"
        if r.get("accuracy_oneshot") is not None:
            acc += f" ({100 * r['accuracy_oneshot']:.2f})"
        lat = r.get("latency")
        lat_s = f"{lat['median_ms']:.3f} ({lat['iqr_ms']:.3f})" if lat else "—"
        prune_s = f"{r['prune_s']:.2f}" if "prune_s" in r else "—"
        lines.append(
            f"| {r['label']} | {r['method']} | ok | {acc} | {_fmt_int(r['params'])} | "
            f"{_fmt_int(r['nonzero_params'])} | {_fmt_int(r['macs'])} | {100 * r['weight_sparsity']:.2f}% | "
            f"{r[red_key]:.2f}x | {lat_s} | {prune_s} |"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """Accuracy (%) against MACs (channel mode) or non-zero parameters (element mode), one point per tool
    that ran plus the dense model. Writes a PNG (matplotlib, Agg backend) and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    key, xlabel = (
        ("macs", "MACs per image")
        if result["config"]["mode"] == "channel"
        else ("nonzero_params", "non-zero parameters")
    )
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    markers = {"dense": "*", "secateur": "o", "torch_pruning": "s", "torch_ao": "^"}
    for r in [result["dense"], *result["rows"]]:
        if r["status"] != "ok":
            continue
        ax.scatter(r[key], 100 * r["accuracy"], s=90, marker=markers.get(r["tool"], "o"), label=r["label"])
        ax.annotate(
            r["label"], (r[key], 100 * r["accuracy"]), textcoords="offset points", xytext=(6, 4), fontsize=8
        )
    cfg = result["config"]
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(
        f"{cfg['model']}: {cfg['mode']} pruning, {cfg['sparsity']:.0%} of {cfg['target']}", fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
