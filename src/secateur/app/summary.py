"""Plain-text tables the commands print at the end (one screen: dense | pruned | change)."""

from __future__ import annotations

__all__ = ["count_rows", "fmt_metric", "human_bytes", "metric_row", "rows_table", "size_change"]

Row = tuple[str, str, str, str]


def fmt_metric(name: str, value: float) -> str:
    """A metric value as printed: perplexity with 2 decimals, accuracy and cosine with 4."""
    return f"{value:.2f}" if name == "perplexity" else f"{value:.4f}"


def human_bytes(n: float) -> str:
    """``n`` bytes in binary units, as every report and doc of secateur gives sizes: ``"86.66 MiB"``
    (1 KiB = 1024 B, 1 MiB = 2**20 B, 1 GiB = 2**30 B; two decimals, whole bytes below 1 KiB)."""
    if n < 1024:
        return f"{n:,.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:,.2f} {unit}"
    return f"{n / 1024:,.2f} GiB"


def size_change(dense: float, pruned: float) -> str:
    """The change of a size on disk written as counts are: ``dense / pruned`` "x smaller" (or "x larger")."""
    if pruned <= dense:
        return f"{dense / max(pruned, 1):.2f}x smaller"
    return f"{pruned / max(dense, 1):.2f}x larger"


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
