"""Plain-text tables the commands print at the end (one screen: dense | pruned | change)."""

from __future__ import annotations

__all__ = ["count_rows", "fmt_metric", "human_bytes", "metric_row", "rows_table", "size_change"]

Row = tuple[str, str, str, str]


def fmt_metric(name: str, value: float) -> str:
    """A metric value as printed: perplexity with 2 decimals, accuracy and cosine with 4."""
    return f"{value:.2f}" if name == "perplexity" else f"{value:.4f}"


_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def _unit_of(n: float) -> str:
    return "B" if n < 2**10 else "KiB" if n < 2**20 else "MiB" if n < 2**30 else "GiB"


def human_bytes(n: float, like: float | None = None) -> str:
    """``n`` bytes in binary units, as every report and doc of secateur gives sizes: ``"86.66 MiB"``
    (1 KiB = 1024 B, 1 MiB = 2**20 B, 1 GiB = 2**30 B; two decimals, whole bytes below 1 KiB). ``like``:
    write ``n`` in the unit ``like`` bytes would take, so two sizes side by side share one unit
    (``human_bytes(336_802, like=1_111_000)`` is ``"0.32 MiB"``, not ``"328.91 KiB"``)."""
    unit = _unit_of(n if like is None else like)
    if unit == "B":
        return f"{n:,.0f} B"
    return f"{n / _UNITS[unit]:,.2f} {unit}"


def size_change(dense: float, pruned: float) -> str:
    """The change of a size on disk written as counts are: ``dense / pruned`` "x smaller" (or "x larger");
    ``"same"`` when equal, ``"about the same"`` when the ratio rounds to 1.00."""
    if pruned == dense:
        return "same"
    ratio = dense / max(pruned, 1) if pruned < dense else pruned / max(dense, 1)
    if f"{ratio:.2f}" == "1.00":
        return "about the same"
    return f"{ratio:.2f}x smaller" if pruned < dense else f"{ratio:.2f}x larger"


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
    report writes it: ``dense / pruned`` "x fewer" (or ``pruned / dense`` "x more"; "same" when equal)."""
    rows = []
    for label, key in (
        ("parameters", "params"),
        ("non-zero parameters", "nonzero_params"),
        ("MACs per example", "macs"),
        ("sparse MACs per example", "sparse_macs"),
    ):
        a, b = dense[key], pruned[key]
        if a == b:
            change = "same"
        else:
            change = f"{a / max(b, 1):.2f}x fewer" if b < a else f"{b / max(a, 1):.2f}x more"
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
