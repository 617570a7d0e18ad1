"""Plain-text tables the commands print at the end (one screen: dense | pruned | change)."""

from __future__ import annotations

__all__ = ["count_rows", "fmt_metric", "human_bytes", "metric_row", "rows_table"]

Row = tuple[str, str, str, str]


def fmt_metric(name: str, value: float) -> str:
    """A metric value as printed: perplexity with 2 decimals, accuracy and cosine with 4."""
    return f"{value:.2f}" if name == "perplexity" else f"{value:.4f}"


def human_bytes(n: float) -> str:
    """``n`` bytes in decimal units (``1.2 MB``)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} GB"


def rows_table(rows: list[Row]) -> str:
    """Aligned columns under the header ``| dense | pruned | change``."""
    head = ("", "dense", "pruned", "change")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    return "\n".join(
        f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}".rstrip()
        for r in [head, *rows]
    )


def count_rows(dense: dict, pruned: dict) -> list[Row]:
    """Parameters, non-zero parameters, MACs and sparse MACs per example, with the change written as the
    report writes it: ``dense / pruned`` "x fewer" (or ``pruned / dense`` "x more")."""
    rows = []
    for label, key in (
        ("parameters", "params"),
        ("non-zero parameters", "nonzero_params"),
        ("MACs per example", "macs"),
        ("sparse MACs per example", "sparse_macs"),
    ):
        a, b = dense[key], pruned[key]
        change = f"{a / max(b, 1):.2f}x fewer" if b <= a else f"{b / max(a, 1):.2f}x more"
        rows.append((label, f"{a:,}", f"{b:,}", change))
    return rows


def metric_row(name: str | None, dense: dict, pruned: dict) -> list[Row]:
    """The metric row (empty when not measured): accuracy change in points, perplexity as a ratio, cosine
    as a difference."""
    if not name or name not in dense or name not in pruned:
        return []
    a, b = dense[name], pruned[name]
    if name == "accuracy":
        change = f"{(b - a) * 100:+.2f} pt"
    elif name == "perplexity":
        change = f"{b / a:.3f}x"
    else:
        change = f"{b - a:+.4f}"
    return [(name, fmt_metric(name, a), fmt_metric(name, b), change)]
