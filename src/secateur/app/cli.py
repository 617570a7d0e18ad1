"""Command-line interface: ``secateur <command>`` (click)."""

from __future__ import annotations

import itertools
import json

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
    n_bn, before = m["config"].get("bn_batches", 0), m.get("pruned_accuracy_before_bn_recalibration")
    if n_bn and isinstance(before, float):
        click.echo(
            f"pruned accuracy is measured after re-estimating BatchNorm statistics on {n_bn} training "
            f"batches; the epoch lines (eval_acc) were measured before it ({before:.4f} when pruning ended)"
        )
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


MODEL_HELP = (
    "zoo:NAME, hf:PATH (a Hugging Face folder), saved:PATH (secateur.save) or package.module:function."
)
DATA_HELP = (
    "auto (what a saved folder recorded; fashion-mnist for 28x28 one-channel models, fortunes for text "
    "models), fashion-mnist, fortunes, an image folder (DIR/<class>/*.png), a text file or folder of .txt "
    "files, datasets:BUILDER:PATH (csv/json/parquet/text, needs the datasets package), or none."
)


def _input_options(f):
    """``--input-spec``, ``--input-shape``, ``--seq-len``: the example inputs (secateur.app.inputs)."""
    f = click.option(
        "--seq-len",
        type=click.IntRange(min=1),
        default=None,
        help="Tokens per example for text models (default 128, capped by the model).",
    )(f)
    f = click.option(
        "--input-shape",
        default=None,
        metavar="N,C,H,W",
        help="One positional float32 input of this shape.",
    )(f)
    return click.option(
        "--input-spec",
        default=None,
        metavar="SPEC",
        help="Example inputs, e.g. 'input_ids:int64[1,128]' or 'pixel_values:float32[1,3,224,224]' "
        "(several: comma or semicolon separated). Default: derived from the model.",
    )(f)


def _data_option(f):
    return click.option("--data", default="auto", show_default=True, help=DATA_HELP)(f)


def _stderr(quiet: bool):
    """The progress ``echo`` of a command: one line on stderr per stage, nothing with --quiet."""
    if quiet:
        return None
    return lambda msg: click.echo(msg, err=True)


@main.command()
@click.option("--model", "model_spec", required=True, help=MODEL_HELP)
@click.option("--model-kwargs", default=None, help="JSON object of keyword arguments for the model factory.")
@click.option("--recipe", "recipe_path", required=True, help="A recipe YAML file or a shipped recipe name.")
@_data_option
@click.option(
    "--subset", type=int, default=None, help="First N images of each split, or N text blocks of each split."
)
@_input_options
@click.option("--out", "out_dir", default="runs/prune", show_default=True, help="Output folder.")
@click.option("--quiet", is_flag=True, help="No progress bars or stage lines.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@_trust_option
def prune(
    model_spec,
    model_kwargs,
    recipe_path,
    data,
    subset,
    input_spec,
    input_shape,
    seq_len,
    out_dir,
    quiet,
    as_json,
    trust_factory,
) -> None:
    """Prune a model with a recipe (fine-tuning if it says so), measure, and save it to OUT/model.

    Any model: example inputs come from --input-spec/--input-shape or from the model (its Hugging Face
    config, a saved folder's record, a zoo model's shape); the metric follows the model and the data:
    accuracy (classifiers on images), perplexity (causal LMs on text), cosine of the outputs to the dense
    model's (encoders). The saved folder (plan.json + model.safetensors, no pickle) records the inputs,
    the data and the tokenizer, so `secateur measure/eval/report --model saved:OUT/model` need no options.
    """
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
            input_spec=input_spec,
            input_shape=input_shape,
            seq_len=seq_len,
            echo=_stderr(quiet or as_json),
        )
    except SecateurError as e:
        _fail(e)
    from secateur.app.export import disk_sizes

    dense_files = disk_sizes(model_spec)  # hf: / saved: specs; a zoo or factory model has no file
    if dense_files:
        m["dense_bytes"] = dense_files["size_on_disk_bytes"]
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    click.echo(_prune_summary(m, recipe_path, out_dir))


def _prune_summary(m: dict, recipe_name: str, out_dir: str) -> str:
    """One screen: what ran, the dense/pruned table, what the metric means, where it is saved, next steps."""
    from secateur.app.summary import count_rows, human_bytes, metric_row, rows_table, size_change

    d, p = m["dense"], m["pruned"]
    rows = metric_row(m.get("metric"), d, p) + count_rows(d, p)
    dense_bytes = m.get("dense_bytes")
    like = max(dense_bytes or 0, m["saved_bytes"])  # one unit for the row
    rows.append(
        (
            "size on disk (weights + plan)",
            human_bytes(dense_bytes, like) if dense_bytes else "-",
            human_bytes(m["saved_bytes"], like),
            size_change(dense_bytes, m["saved_bytes"]) if dense_bytes else "",
        )
    )
    comp = m.get("compressed")
    if comp:
        ratio = size_change(m["saved_bytes"], comp["bytes"]) + " than saved"
        rows.append((f"  {comp['format']}", "", human_bytes(comp["bytes"], like=m["saved_bytes"]), ratio))
    lines = [
        f"secateur prune: {m['model']} ({m['kind']}) with recipe {recipe_name}",
        f"  data: {m['data']}",
        f"  inputs: {m['input_spec']} ({m['inputs_from']}); MACs are per example (batch 1)",
        "",
        rows_table(rows),
        "",
    ]
    metric = m.get("metric")
    if metric:
        note = f"{metric} of the pruned model is measured at the end"
        if m.get("bn_batches"):
            note += (
                f", after re-estimating BatchNorm statistics on {m['bn_batches']} training "
                f"batch{'es' if m['bn_batches'] != 1 else ''} "
                "(per-epoch figures were measured before it)"
            )
        if metric == "cosine":
            note += "; cosine = mean cosine similarity of the outputs to the dense model's (1 = identical)"
        lines.append(note + ".")
    chance = m.get("chance")
    if metric == "accuracy" and chance is not None and d.get("accuracy", 1.0) < chance + 0.1:
        lines.append(
            f"WARNING: the dense model's accuracy {d['accuracy']:.4f} is near chance ({chance:.2f}): it "
            "looks untrained, so the pruned figures say little. Train it first "
            "(secateur finetune --model ... --out runs/dense) and prune saved:runs/dense/model."
        )
    sparse_ratio = d["sparse_macs"] / max(p["sparse_macs"], 1)
    lines.append(
        f"{_removed_sentence(m)}; per example {m['macs_ratio']:.2f}x fewer MACs, {sparse_ratio:.2f}x fewer "
        "sparse MACs (multiplications by non-zero weights)."
    )
    saved = m["saved"]
    stored = "; safetensors stores the zeros densely" if comp else ": removed channels are gone from it"
    lines += [f"saved to {saved} (plan.json + model.safetensors{stored}); metrics in {out_dir}/metrics.json"]
    if comp:
        lines.append(
            f"compressed weights: {comp['path']} (secateur.io.compressed.load_compressed reads them back)"
        )
    lines += [
        f"next: secateur measure --model saved:{saved} --latency",
        f"      secateur report --dense {m['model']} --pruned saved:{saved}",
    ]
    return "\n".join(lines)


#: What a channel recipe's ``target`` counts, as the prune summary names it.
_TARGETS = {
    "channels": "the channels", "params": "the parameters", "macs": "the MACs", "latency": "the latency"
}


def _removed_sentence(m: dict) -> str:
    """``"removed 28.6% of the channels (recipe: 30%)"``: the achieved fraction of the recipe's target
    quantity (channels of each group, weights in scope, ...) beside the fraction the recipe asks for."""
    recipe = m.get("recipe") or {}
    if recipe.get("granularity") == "channel":
        what = _TARGETS.get(recipe.get("target"), f"the {recipe.get('target')}")
    else:
        what = "the weights in scope"
    asked = recipe.get("sparsity")
    asked_text = f" (recipe: {100 * asked:.3g}%)" if isinstance(asked, (int, float)) else ""
    return f"removed {100 * m['sparsity']:.1f}% of {what}{asked_text}"


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(
            f"{text!r}: positive integers separated by commas, e.g. 1,32", param_hint="--batch"
        )
    return sizes


@main.command()
@click.option("--model", "model_spec", required=True, help=MODEL_HELP)
@click.option("--model-kwargs", default=None, help="JSON object of keyword arguments for the model factory.")
@_input_options
@click.option(
    "--latency/--no-latency",
    default=False,
    show_default=True,
    help="Also time it in eager PyTorch, TorchScript (torch.compile when tracing fails) and ONNX Runtime.",
)
@click.option("--batch", default="1", show_default=True, help="Batch sizes for latency, e.g. 1,32.")
@click.option(
    "--compiled",
    type=click.Choice(["auto", "torchscript", "compile", "none"]),
    default="auto",
    show_default=True,
    help="The compiled PyTorch runtime: TorchScript (auto: torch.compile if tracing fails), or none.",
)
@click.option("--int8/--no-int8", default=False, show_default=True, help="Also time an int8 ONNX model.")
@click.option("--data", default="auto", show_default=True, help="Calibration data for static int8 (CNNs).")
@click.option("--repeats", default=10, show_default=True, type=click.IntRange(min=1), help="Timed blocks.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1), help="Threads.")
@click.option("--quiet", is_flag=True, help="No latency table on stderr.")
@_trust_option
def measure(
    model_spec,
    model_kwargs,
    input_spec,
    input_shape,
    seq_len,
    latency,
    batch,
    compiled,
    int8,
    data,
    repeats,
    threads,
    quiet,
    trust_factory,
) -> None:
    """Parameters, non-zero parameters, MACs and sparse MACs per example, size on disk (JSON on stdout);
    with --latency, each runtime side by side (ms per batch, median and IQR, speed-up over eager, file size;
    ONNX outputs checked against PyTorch's), also as a table on stderr."""
    from secateur.app.export import deployment_rows, disk_sizes, heldout_example, static_int8
    from secateur.app.run import open_session
    from secateur.errors import SecateurError

    sizes = _batch_sizes(batch)
    try:
        s = open_session(
            model_spec,
            data=data if int8 else "none",
            input_spec=input_spec,
            input_shape=input_shape,
            seq_len=seq_len,
            model_kwargs=_parse_kwargs(model_kwargs),
            trust_factory=trust_factory,
        )
        out = {
            "model": model_spec,
            "kind": s.kind.label,
            **s.counts(),
            "macs_per": "example (batch 1)",
            "input_spec": s.input_spec,
            "inputs_from": s.fields_source,
            "input_shape": list(s.fields[0].shape),
            **disk_sizes(model_spec, s.model),
        }
        if latency:
            calibration = None
            if int8 and s.data.kind == "images" and static_int8(s.model):  # a CNN: static int8, calibrated
                calibration = [x for x, _ in itertools.islice(s.data.train, 8)]
            # ONNX outputs are checked on held-out data when it is loaded (int8), else on synthetic inputs
            held = heldout_example(s) if int8 else None
            example, checked_on = held if held is not None else (None, "synthetic example inputs")
            rows = deployment_rows(
                s.model,
                s.fields,
                batch_sizes=sizes,
                compiled=None if compiled == "none" else compiled,
                int8=int8,
                calibration=calibration,
                repeats=repeats,
                threads=threads,
                example=example,
            )
            out["latency"] = {
                "unit": "ms per forward of the batch",
                "threads": threads,
                "checked_on": checked_on,
                "rows": rows,
            }
            if not quiet:
                from secateur.analysis.deploy import format_deployment

                click.echo(format_deployment(rows), err=True)
                click.echo(f"ONNX outputs compared with PyTorch's on {checked_on}.", err=True)
    except SecateurError as e:
        _fail(e)
    click.echo(json.dumps(out, indent=2, default=str))


@main.command(name="eval")
@click.option("--model", "model_spec", required=True, help=MODEL_HELP)
@_data_option
@click.option("--subset", type=int, default=None, help="First N test images, or N held-out text blocks.")
@_input_options
@click.option(
    "--reference",
    default=None,
    help="The dense model for the cosine metric (default: the model a saved folder was pruned from).",
)
@_trust_option
def evaluate(model_spec, data, subset, input_spec, input_shape, seq_len, reference, trust_factory) -> None:
    """The task's metric on held-out data (JSON on stdout): accuracy for classifiers on images, perplexity
    for causal LMs on text, cosine of the outputs to the dense model's for encoders."""
    from secateur.app.models import build_model
    from secateur.app.run import open_session
    from secateur.errors import ConfigError, SecateurError

    try:
        s = open_session(
            model_spec,
            data=data,
            input_spec=input_spec,
            input_shape=input_shape,
            seq_len=seq_len,
            subset=subset,
            trust_factory=trust_factory,
        )
        if s.evaluator is None:
            raise ConfigError("no data to evaluate on (--data none); give --data")
        if s.metric == "cosine":
            ref = reference or s.metadata.get("dense_model") or s.metadata.get("model")
            if not ref:
                raise ConfigError("the cosine metric compares with the dense model: give --reference SPEC")
            s.evaluator.set_reference(
                build_model(ref, trust_factory=trust_factory if ref.startswith("saved:") else ())
            )
        value = s.evaluator(s.model)
        click.echo(
            json.dumps(
                {"model": model_spec, "metric": s.metric, s.metric: value, "data": s.data.evaluated_on}
            )
        )
    except SecateurError as e:
        _fail(e)


@main.command()
@click.argument("name", required=False)
def recipes(name) -> None:
    """List the shipped recipes (what each does, which model kinds it suits), or print one as YAML.

    The YAML is the whole recipe with every default written out: edit a copy and pass it to
    `secateur prune --recipe FILE`, or read it in Python with secateur.Recipe.from_yaml(FILE).
    """
    from secateur.app.recipe import load_recipe, shipped_recipes, suited_kinds
    from secateur.errors import SecateurError

    if name:
        try:
            click.echo(load_recipe(name).to_yaml(), nl=False)
        except SecateurError as e:
            _fail(e)
        return
    for n in shipped_recipes():
        r = load_recipe(n)
        kinds, needs = suited_kinds(r)
        click.echo(f"{n}: {r.description}")
        click.echo(f"    suits: {r.suits or 'not stated'}")
        click.echo(f"    model kinds: {', '.join(kinds)}; data: {needs}")


@main.command()
@click.option(
    "--dense", "dense_spec", required=True, help="The unpruned model (zoo:NAME, hf:PATH, saved:PATH, ...)."
)
@click.option("--pruned", "pruned_spec", required=True, help="The pruned model (usually saved:RUN/model).")
@_data_option
@click.option("--subset", type=int, default=None, help="Evaluate on the first N test images / N text blocks.")
@_input_options
@click.option("--batch", default=32, show_default=True, help="Batch size for latency.")
@click.option(
    "--repeats",
    default=30,
    show_default=True,
    type=click.IntRange(min=1),
    help="Timed blocks per model; timing is the longest stage: --batch 1 --repeats 3 makes it quick.",
)
@click.option(
    "--onnx/--no-onnx", default=False, show_default=True, help="Also time both models in ONNX Runtime."
)
@click.option("--out", "out_dir", default="runs/report", show_default=True, help="Output folder.")
@click.option("--quiet", is_flag=True, help="No stage lines on stderr.")
@_trust_option
def report(
    dense_spec,
    pruned_spec,
    data,
    subset,
    input_spec,
    input_shape,
    seq_len,
    batch,
    repeats,
    onnx,
    out_dir,
    quiet,
    trust_factory,
) -> None:
    """Measure a dense and a pruned model side by side; write report.html, report.md and report.json."""
    from secateur.app.reports import run_report
    from secateur.errors import SecateurError

    try:
        res = run_report(
            dense_spec,
            pruned_spec,
            data=data,
            subset=subset,
            input_spec=input_spec,
            input_shape=input_shape,
            seq_len=seq_len,
            batch=batch,
            repeats=repeats,
            onnx=onnx,
            out_dir=out_dir,
            trust_factory=trust_factory,
            echo=_stderr(quiet),
        )
    except SecateurError as e:
        _fail(e)
    click.echo(res["summary"])


@main.command()
@click.option(
    "--model", "model_spec", required=True, help="zoo:NAME, hf:PATH, saved:PATH, ... (see prune --help)."
)
@click.option("--model-kwargs", default=None, help="JSON object of keyword arguments for the model factory.")
@_data_option
@_input_options
@click.option("--epochs", default=1, show_default=True)
@click.option("--lr", default=0.05, show_default=True)
@click.option("--batch-size", default=128, show_default=True)
@click.option("--subset", type=int, default=None, help="Use only the first N images of each split.")
@click.option(
    "--seed", default=0, show_default=True, help="Seeds the weights' start, the shuffle and training."
)
@click.option("--out", "out_dir", default="runs/finetune", show_default=True, help="Output folder.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_trust_option
def finetune(
    model_spec,
    model_kwargs,
    data,
    input_spec,
    input_shape,
    seq_len,
    epochs,
    lr,
    batch_size,
    subset,
    seed,
    out_dir,
    quiet,
    trust_factory,
) -> None:
    """Train a classifier (dense or pruned; masks are kept) on labelled images and save it to OUT/model.

    Two runs with the same options and --seed give bit-identical weights (deterministic algorithms).
    """
    from secateur.app.run import finetune_model
    from secateur.errors import SecateurError

    try:
        out = finetune_model(
            model_spec,
            data=data,
            input_spec=input_spec,
            input_shape=input_shape,
            seq_len=seq_len,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            subset=subset,
            seed=seed,
            out_dir=out_dir,
            progress=not quiet,
            model_kwargs=_parse_kwargs(model_kwargs),
            trust_factory=trust_factory,
            user_factory=_user_factory(model_spec),
        )
    except SecateurError as e:
        _fail(e)
    click.echo(json.dumps(out))


@main.command()
@click.option("--model", "model_spec", required=True, help=MODEL_HELP)
@click.option("--model-kwargs", default=None, help="JSON object of keyword arguments for the model factory.")
@click.option("--out", "out_path", required=True, help="The ONNX file to write (e.g. model.onnx).")
@click.option(
    "--opset", type=click.IntRange(min=7), default=None, help="ONNX opset (default: the exporter's)."
)
@click.option(
    "--quantize",
    type=click.Choice(["int8"]),
    default=None,
    help="Also write OUT with suffix .int8.onnx, quantised by ONNX Runtime (dynamic for transformers, "
    "static with calibration data for CNNs).",
)
@_input_options
@_data_option
@click.option("--calibration-batches", default=8, show_default=True, help="Batches for static int8.")
@click.option("--dynamic-batch/--fixed-batch", default=True, show_default=True, help="Batch axis dynamic.")
@click.option("--quiet", is_flag=True, help="No stage lines on stderr.")
@_trust_option
def export(
    model_spec,
    model_kwargs,
    out_path,
    opset,
    quantize,
    input_spec,
    input_shape,
    seq_len,
    data,
    calibration_batches,
    dynamic_batch,
    quiet,
    trust_factory,
) -> None:
    """Export a model to ONNX (opset stated), optionally int8-quantised; check ONNX Runtime against PyTorch
    on the example inputs and print the files, sizes and the largest output difference (JSON)."""
    from secateur.app.export import export_model
    from secateur.errors import SecateurError

    try:
        out = export_model(
            model_spec,
            out_path,
            opset=opset,
            quantize=quantize,
            input_spec=input_spec,
            input_shape=input_shape,
            seq_len=seq_len,
            data=data,
            calibration_batches=calibration_batches,
            dynamic_batch=dynamic_batch,
            model_kwargs=_parse_kwargs(model_kwargs),
            trust_factory=trust_factory,
            echo=_stderr(quiet),
        )
    except SecateurError as e:
        _fail(e)
    click.echo(json.dumps(out, indent=2))


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
@click.option(
    "--dense-epochs",
    type=click.IntRange(min=0),
    default=None,
    help="Train the dense model first for N epochs (default: 1 for a fresh zoo/hf/factory model, 0 for "
    "saved:PATH).",
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
    dense_epochs,
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
            dense_epochs=dense_epochs,
        )
    except SecateurError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
        return
    click.echo(markdown(result))
    click.echo(f"\ntable: {out_dir}/compare.md, results: {out_dir}/compare.json, plot: {out_dir}/compare.png")
