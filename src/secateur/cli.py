"""Command-line interface: ``secateur <command>`` (click)."""

from __future__ import annotations

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
    from secateur.demo import DemoConfig, run_demo, summary_rows

    cfg = DemoConfig(
        out_dir=out_dir, dense_epochs=dense_epochs, prune_epochs=prune_epochs, sparsity=sparsity,
        subset=subset, seed=seed, progress=not quiet,
    )
    m = run_demo(cfg)
    if as_json:
        click.echo(json.dumps({k: v for k, v in m.items() if k not in ("history", "layers")}, indent=2))
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
    console.print(
        f"sparsity {m['sparsity']:.4f}; report: {out_dir}/report.md, metrics: {out_dir}/metrics.json"
    )
