"""Command-line interface: ``secateur <command>`` (click)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="secateur")
def main() -> None:
    """secateur: neural network pruning for PyTorch."""


@main.command()
@click.option("--out", "out_dir", default="runs/demo", show_default=True, help="Output folder.")
@click.option("--dense-epochs", default=4, show_default=True, help="Dense training epochs.")
@click.option("--prune-epochs", default=4, show_default=True, help="Fine-tuning epochs while pruning.")
@click.option("--sparsity", default=0.9, show_default=True, help="Final global sparsity (fraction).")
@click.option("--subset", type=int, default=None, help="Use only the first N images of each split.")
@click.option("--seed", default=0, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON instead of a table.")
def demo(out_dir, dense_epochs, prune_epochs, sparsity, subset, seed, quiet, as_json) -> None:
    """Train a ResNet on Fashion-MNIST, prune it to 90% with the cubic schedule, report."""
    from secateur.app.demo import DemoConfig, run_demo, summary_rows

    cfg = DemoConfig(
        out_dir=out_dir,
        dense_epochs=dense_epochs,
        prune_epochs=prune_epochs,
        sparsity=sparsity,
        subset=subset,
        seed=seed,
        progress=not quiet,
    )
    m = run_demo(cfg)
    if as_json:
        skip = ("history", "layers", "layer_comparison")
        click.echo(json.dumps({k: v for k, v in m.items() if k not in skip}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"secateur demo: {cfg.model} on Fashion-MNIST, dense vs pruned")
    for col in ("", "dense", "pruned"):
        table.add_column(col, justify="right" if col else "left")
    for row in summary_rows(m):
        table.add_row(*row)
    console = Console()
    console.print(table)
    paths = m["outputs"]
    click.echo(f"sparsity {m['sparsity']:.4f}; metrics: {paths['metrics']}")
    click.echo(f"report: {paths['html']} (self-contained, open in a browser), {paths['md']}")


def _parse_kwargs(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object, e.g. '{\"stem_stride\": 2}'")
    return value


def _user_factory(model_spec: str) -> list[str]:
    """``[model_spec]`` when it names a user factory (``package.module:function``), else ``[]``: the names
    :func:`secateur.load` may run because the user typed them (a saved folder's own names are never run)."""
    scheme = model_spec.partition(":")[0]
    return [] if scheme in ("zoo", "hf", "saved") else [model_spec]


def _fail(e: Exception) -> None:
    raise click.ClickException(str(e))


def _trust_option(f):
    """``--trust-factory NAME`` (repeatable): user factories a ``saved:`` folder may run (secateur.load)."""
    return click.option(
        "--trust-factory",
        "trust_factory",
        multiple=True,
        metavar="NAME",
        help="For --model saved:PATH built by a user factory: trust this factory name "
        "(package.module:function; repeatable). Nothing a folder names runs otherwise.",
    )(f)


@main.command()
@click.option(
    "--model", "model_spec", required=True, help="zoo:NAME, hf:PATH, saved:PATH or package.module:function."
)
@click.option("--model-kwargs", default=None, help="JSON object of keyword arguments for the model factory.")
@click.option("--recipe", "recipe_path", required=True, help="A recipe YAML file or a shipped recipe name.")
@click.option(
    "--data",
    default="fashion-mnist",
    show_default=True,
    type=click.Choice(["fashion-mnist", "none"]),
    help="Training/evaluation data.",
)
@click.option("--subset", type=int, default=None, help="Use only the first N images of each split.")
@click.option("--out", "out_dir", default="runs/prune", show_default=True, help="Output folder.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@_trust_option
def prune(
    model_spec, model_kwargs, recipe_path, data, subset, out_dir, quiet, as_json, trust_factory
) -> None:
    """Prune a model with a recipe, fine-tune, measure, and save it (pickle-free) to OUT/model."""
    from secateur.app.recipe import load_recipe
    from secateur.app.run import run
    from secateur.errors import SecateurError

    try:
        recipe = load_recipe(recipe_path)
        m = run(
            model_spec,
            recipe,
            out_dir,
            data=data,
            subset=subset,
            progress=not quiet,
            model_kwargs=_parse_kwargs(model_kwargs),
            trust_factory=trust_factory,
        )
    except SecateurError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    d, p = m["dense"], m["pruned"]
    rows = [
        ("parameters", d["params"], p["params"]),
        ("non-zero parameters", d["nonzero_params"], p["nonzero_params"]),
        ("MACs", d["macs"], p["macs"]),
        ("sparse MACs", d["sparse_macs"], p["sparse_macs"]),
    ]
    if "accuracy" in d:
        click.echo(f"accuracy: dense {d['accuracy']:.4f}  pruned {p['accuracy']:.4f}")
    for name, a, b in rows:
        click.echo(f"{name:>20}: {a:>14,} -> {b:>14,}  ({b / max(a, 1):.3f}x)")
    click.echo(f"saved to {out_dir}/model (plan.json + model.safetensors); metrics in {out_dir}/metrics.json")


@main.command()
@click.option(
    "--model", "model_spec", required=True, help="zoo:NAME, hf:PATH, saved:PATH or package.module:function."
)
@click.option("--model-kwargs", default=None, help="JSON object of keyword arguments for the model factory.")
@click.option("--input-shape", default="1,1,28,28", show_default=True, help="Example input shape (N,C,H,W).")
@click.option("--latency/--no-latency", default=False, show_default=True, help="Also measure CPU latency.")
@_trust_option
def measure(model_spec, model_kwargs, input_shape, latency, trust_factory) -> None:
    """Count parameters, non-zero parameters, MACs and sparse MACs (JSON on stdout)."""
    import torch

    from secateur.analysis import count_macs, count_params
    from secateur.app.models import build_model
    from secateur.errors import SecateurError

    try:
        model = build_model(model_spec, trust_factory=trust_factory, **_parse_kwargs(model_kwargs)).eval()
        shape = tuple(int(s) for s in input_shape.split(","))
        x = torch.zeros(shape)
        out = {**count_params(model), **count_macs(model, x), "input_shape": list(shape)}
        if latency:
            from secateur.analysis.latency import measure_latency

            out["latency"] = measure_latency(model, x)
    except SecateurError as e:
        _fail(e)
    click.echo(json.dumps(out, indent=2))


@main.command(name="eval")
@click.option("--model", "model_spec", required=True, help="zoo:NAME, saved:PATH, ... (see prune --help).")
@click.option("--subset", type=int, default=None, help="Use only the first N test images.")
@_trust_option
def evaluate(model_spec, subset, trust_factory) -> None:
    """Top-1 accuracy on the Fashion-MNIST test set (JSON on stdout)."""
    from secateur.app.models import build_model
    from secateur.app.run import evaluate_accuracy
    from secateur.data import fashion_mnist_loaders
    from secateur.errors import SecateurError

    try:
        model = build_model(model_spec, trust_factory=trust_factory)
        _, test = fashion_mnist_loaders(subset=subset)
        click.echo(json.dumps({"model": model_spec, "accuracy": evaluate_accuracy(model, test)}))
    except SecateurError as e:
        _fail(e)


@main.command()
@click.argument("name", required=False)
def recipes(name) -> None:
    """List the shipped recipes (what each does, which models it suits), or print one as YAML.

    The YAML is the whole recipe with every default written out: edit a copy and pass it to
    `secateur prune --recipe FILE`, or read it in Python with secateur.Recipe.from_yaml(FILE).
    """
    from secateur.app.recipe import load_recipe, shipped_recipes
    from secateur.errors import SecateurError

    if name:
        try:
            click.echo(load_recipe(name).to_yaml(), nl=False)
        except SecateurError as e:
            _fail(e)
        return
    for n in shipped_recipes():
        r = load_recipe(n)
        click.echo(f"{n}: {r.description}")
        click.echo(f"    suits: {r.suits or 'not stated'}")


@main.command()
@click.option("--dense", "dense_spec", required=True, help="The unpruned model (zoo:NAME, saved:PATH, ...).")
@click.option("--pruned", "pruned_spec", required=True, help="The pruned model (usually saved:RUN/model).")
@click.option(
    "--data", default="fashion-mnist", show_default=True, type=click.Choice(["fashion-mnist", "none"])
)
@click.option("--subset", type=int, default=None, help="Evaluate on the first N test images only.")
@click.option("--batch", default=32, show_default=True, help="Batch size for latency.")
@click.option(
    "--onnx/--no-onnx", default=False, show_default=True, help="Also time both models in ONNX Runtime."
)
@click.option("--out", "out_dir", default="runs/report", show_default=True, help="Output folder.")
@_trust_option
def report(dense_spec, pruned_spec, data, subset, batch, onnx, out_dir, trust_factory) -> None:
    """Measure a dense and a pruned model side by side; write report.html and report.md."""
    import torch

    from secateur.analysis.report import build_report, collect_results
    from secateur.app.models import build_model
    from secateur.errors import SecateurError

    try:
        dense, pruned = (
            build_model(spec, trust_factory=trust_factory if spec.startswith("saved:") else ()).eval()
            for spec in (dense_spec, pruned_spec)
        )
        acc = {}
        description = "No accuracy measured (--data none)."
        if data == "fashion-mnist":
            from secateur.app.run import evaluate_accuracy
            from secateur.data import fashion_mnist_loaders

            _, test = fashion_mnist_loaders(subset=subset)
            acc = {
                "dense_accuracy": evaluate_accuracy(dense, test),
                "pruned_accuracy": evaluate_accuracy(pruned, test),
            }
            which = "the full 10,000-image" if subset is None else f"the first {min(subset, 10_000):,}"
            description = f"Accuracy on {which} Fashion-MNIST test images."
        argv = [
            "secateur",
            "report",
            "--dense",
            dense_spec,
            "--pruned",
            pruned_spec,
            "--data",
            data,
            "--batch",
            str(batch),
            "--out",
            out_dir,
        ]
        argv += (["--subset", str(subset)] if subset is not None else []) + (["--onnx"] if onnx else [])
        argv += [a for name in trust_factory for a in ("--trust-factory", name)]
        results = collect_results(
            dense,
            pruned,
            torch.zeros(batch, 1, 28, 28),
            onnx_dir=f"{out_dir}/onnx" if onnx else None,
            command=shlex.join(argv),
            description=f"Dense {dense_spec} vs pruned {pruned_spec}. {description}",
            **acc,
        )
        paths = build_report(results, out_dir)
    except SecateurError as e:
        _fail(e)
    click.echo(
        json.dumps({k: str(v) for k, v in dict(paths).items()} if isinstance(paths, dict) else str(paths))
    )


@main.command()
@click.option("--model", "model_spec", required=True, help="zoo:NAME, saved:PATH, ... (see prune --help).")
@click.option("--model-kwargs", default=None, help="JSON object of keyword arguments for the model factory.")
@click.option("--epochs", default=1, show_default=True)
@click.option("--lr", default=0.05, show_default=True)
@click.option("--batch-size", default=128, show_default=True)
@click.option("--subset", type=int, default=None, help="Use only the first N images of each split.")
@click.option("--out", "out_dir", default="runs/finetune", show_default=True, help="Output folder.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_trust_option
def finetune(model_spec, model_kwargs, epochs, lr, batch_size, subset, out_dir, quiet, trust_factory) -> None:
    """Train a model (dense or pruned; masks are kept) on Fashion-MNIST and save it to OUT/model."""
    from secateur.app.models import build_model
    from secateur.data import fashion_mnist_loaders
    from secateur.errors import SecateurError
    from secateur.io import load, save
    from secateur.train import Trainer

    try:
        model = build_model(model_spec, trust_factory=trust_factory, **_parse_kwargs(model_kwargs))
        plan = None
        if model_spec.startswith("saved:"):  # build_model loaded it; its plan is re-saved with it
            from secateur.io.validate import read_plan_file

            plan = read_plan_file(Path(model_spec[6:])).get("plan")
        train, test = fashion_mnist_loaders(batch_size=batch_size, subset=subset)
        trainer = Trainer(model, train, test, epochs=epochs, lr=lr, progress=not quiet)
        trainer.fit()
        acc = trainer.evaluate(test)["accuracy"]
        save(model, Path(out_dir) / "model", plan=plan, metadata={"accuracy": acc, "epochs": epochs})
        # fail now, not later, if it does not reload (a factory named on this command line is trusted)
        load(Path(out_dir) / "model", trust_factory=_user_factory(model_spec) + list(trust_factory))
    except SecateurError as e:
        _fail(e)
    click.echo(json.dumps({"accuracy": acc, "saved": f"{out_dir}/model"}))


@main.command()
@click.option("--model", "model_spec", required=True, help="zoo:NAME, saved:PATH, ... (see prune --help).")
@click.option("--model-kwargs", default=None, help="JSON object of keyword arguments for the model factory.")
@click.option(
    "--mode",
    default="channel",
    show_default=True,
    type=click.Choice(["channel", "element"]),
    help="Remove whole channels, or zero individual weights.",
)
@click.option("--sparsity", default=0.5, show_default=True, help="Fraction of the target to remove.")
@click.option(
    "--target",
    default="channels",
    show_default=True,
    type=click.Choice(["channels", "params", "macs"]),
    help="Channel mode: what the sparsity is a fraction of.",
)
@click.option("--epochs", default=1, show_default=True, help="Fine-tuning epochs (the same for every tool).")
@click.option("--steps", type=int, default=None, help="Fine-tuning optimizer steps (overrides --epochs).")
@click.option("--lr", default=0.01, show_default=True, help="Fine-tuning learning rate (SGD, cosine).")
@click.option("--batch-size", default=128, show_default=True)
@click.option("--subset", type=int, default=None, help="Use only the first N images of each split.")
@click.option("--seed", default=0, show_default=True)
@click.option("--latency-batch", default=32, show_default=True, help="Batch size for latency.")
@click.option("--latency-repeats", default=20, show_default=True, help="Timing rounds (0: no latency).")
@click.option(
    "--tools",
    default="secateur,torch_pruning,torch_ao",
    show_default=True,
    help="Comma-separated tools to compare.",
)
@click.option("--out", "out_dir", default="runs/compare", show_default=True, help="Output folder.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
@_trust_option
def compare(
    model_spec,
    model_kwargs,
    mode,
    sparsity,
    target,
    epochs,
    steps,
    lr,
    batch_size,
    subset,
    seed,
    latency_batch,
    latency_repeats,
    tools,
    out_dir,
    quiet,
    as_json,
    trust_factory,
) -> None:
    """Prune one model at one budget with secateur, Torch-Pruning and torch.ao.pruning; fine-tune alike;
    write compare.md, compare.json and compare.png to OUT."""
    from secateur.app.compare import compare as run_compare
    from secateur.app.compare import markdown
    from secateur.errors import SecateurError

    try:
        result = run_compare(
            model_spec,
            mode=mode,
            sparsity=sparsity,
            target=target,
            epochs=epochs,
            steps=steps,
            lr=lr,
            batch_size=batch_size,
            subset=subset,
            seed=seed,
            latency_batch=latency_batch,
            latency_repeats=latency_repeats,
            out_dir=out_dir,
            model_kwargs=_parse_kwargs(model_kwargs),
            tools=tuple(t.strip() for t in tools.split(",") if t.strip()),
            progress=not quiet,
            trust_factory=tuple(trust_factory),
        )
    except SecateurError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
        return
    click.echo(markdown(result))
    click.echo(f"\ntable: {out_dir}/compare.md, results: {out_dir}/compare.json, plot: {out_dir}/compare.png")
