"""Why Torch-Pruning's L1 chose better channels than secateur's, and the fix, measured (issue 14).

    python benchmarks/l1_vs_tp.py --out benchmarks/results/l1_vs_tp.json     # ~15 min on one core

Same protocol and cached dense weights as ``benchmarks/tradeoff.py --name standard`` (Fashion-MNIST, 20k
training images, 3 dense epochs, 100 fine-tuning SGD steps, the same batches for every method at a seed,
all 10k test images), on ResNet-8 (half width, stride-2 stem) and VGG-small (1/8 width), seeds 0-2.

1. **Channel choice** (``analysis``): on each seed's dense weights, Torch-Pruning 1.6's ``MagnitudePruner``
   (``MagnitudeImportance(p=1)``, one per-layer ratio, the classifier's output ignored) at ratio 0.5 is
   compared group by group with secateur's ``l1``, before (``old``: a reference copy of the previous
   formula, :func:`old_l1_scores`) and after the fix (``new``,
   :func:`secateur.criteria.group.norms.lp_scores`): widths, the Jaccard index of the kept channel sets
   when each side removes Torch-Pruning's count, the Spearman correlation of the scores, and the scores
   themselves; plus which single ingredient of the old formula moves it towards Torch-Pruning's choice
   (``ablation``).
2. **Accuracy at equal MACs** (``points``): for MAC targets 2x / 3x / 4x, Torch-Pruning's ratio is chosen
   on a 0.02 grid to land closest to the target (as tradeoff.py does). ``@tp-widths``: secateur's old and
   new ``l1`` remove Torch-Pruning's channel count from every group (the same widths and MACs: only the
   choice of channels differs). ``@tp``: they remove the MAC fraction closest to the one Torch-Pruning
   reached, by secateur's own allocation, with uniform allocation through
   :func:`secateur.allocation.structured.uniform_removal_for` (the least overshoot along the common
   fraction) and a scan of its target (:func:`closest_removal`), so achieved MACs match to within a
   channel's step. For reference, both also run through
   ``ChannelPruner(target="macs", allocation="uniform")`` at the nominal target (the pruner as it selects
   today: the smallest common fraction, which may overshoot). Every pruned model is compacted under the
   oracle (``verify=True``), fine-tuned and evaluated.

JSON (``--out``): ``config``, ``environment``, ``analysis`` (per model, seed, group), ``points`` (per
model, target, method, seed: ``achieved_macs_x``, ``params``, ``widths``, ``accuracy_oneshot``,
``accuracy``), ``summary`` (mean and median over seeds) and ``checks`` (new ``l1`` at Torch-Pruning's widths
and at its MACs >= Torch-Pruning - 0.1 point on the mean, MACs within 3%, for every model and target).
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import tradeoff as T  # noqa: E402
from secateur.allocation.structured import ensure_member_nonempty, uniform_removal_for  # noqa: E402
from secateur.analysis.counting import count_macs, count_params  # noqa: E402
from secateur.criteria.group.norms import lp_scores  # noqa: E402
from secateur.graph.groups import DependencyGraph, Group  # noqa: E402
from secateur.pruners.channel import ChannelPruner  # noqa: E402
from secateur.pruners.oneshot import remove_units  # noqa: E402

try:
    import torch_pruning as tp
except ImportError:  # pragma: no cover - depends on the environment
    tp = None

MODELS = ["resnet8:width=0.5,stem_stride=2", "vgg_small:width=0.125"]
METHODS = {
    "tp-magnitude": "Torch-Pruning MagnitudePruner (L1), grid ratio closest to the target",
    "secateur-old@tp-widths": "secateur l1 before the fix, Torch-Pruning's channel count in every group",
    "secateur-default@tp-widths": "secateur l1 (fixed), Torch-Pruning's channel count in every group",
    "secateur-old@tp": "secateur l1 before the fix, uniform allocation closest to Torch-Pruning's MACs",
    "secateur-default@tp": "secateur l1 (fixed), uniform allocation closest to Torch-Pruning's MACs",
    "secateur-old@target": "secateur l1 before the fix, ChannelPruner at the nominal target",
    "secateur-default@target": "secateur l1 (fixed), ChannelPruner at the nominal target",
}


# ------------------------------------------------------------------------------------------ criteria
def old_l1_scores(group: Group, model: nn.Module, p: float = 1.0) -> np.ndarray:
    """The previous secateur ``l1`` (reference copy, for the comparison only): per parameter member along
    dim 0 (filters, conv biases, BN γ and β; the consumers only when no such member exists) the mean
    ``|w|^p`` of each unit's slice, divided by its mean over units, summed over members."""
    named = dict(model.named_parameters())
    members = [m for m in group.members if not m.is_buffer]
    if any(m.dim == 0 for m in members):
        members = [m for m in members if m.dim == 0]
    total = np.zeros(group.n_units)
    for m in members:
        t = named[m.name].detach().double()
        a = t.movedim(m.dim, 0).reshape(t.shape[m.dim], -1).abs().pow(p).mean(1).numpy()
        per = np.bincount(m.unit_of, weights=a, minlength=group.n_units)
        per = per / np.maximum(np.bincount(m.unit_of, minlength=group.n_units), 1)
        total += per / max(per.mean(), 1e-12)
    return total


def member_terms(group: Group, model: nn.Module) -> dict[str, np.ndarray]:
    """``{member "name:dim": (n_units,) Σ|w| of each unit's slice}`` (float64), every parameter member."""
    named = dict(model.named_parameters())
    out = {}
    for m in group.members:
        if m.is_buffer:
            continue
        t = named[m.name].detach().double()
        a = t.movedim(m.dim, 0).reshape(t.shape[m.dim], -1).abs().sum(1).numpy()
        out[f"{m.name}:{m.dim}"] = np.bincount(m.unit_of, weights=a, minlength=group.n_units)
    return out


def ablation_scores(group: Group, model: nn.Module) -> dict[str, np.ndarray]:
    """The old formula with one ingredient changed at a time, and the new one (all higher = keep)."""
    terms = member_terms(group, model)
    n = {k: v / max(v.mean(), 1e-12) for k, v in terms.items()}
    prod = [k for k in terms if k.endswith(":0")]
    nobias = [k for k in terms if ".bias:" not in k]
    return {
        "old (producers, biases and β, each member mean-normalised)": old_l1_scores(group, model),
        "old without biases and β": sum(n[k] for k in prod if k in nobias),
        "old + consumers, without biases and β (still normalised)": sum(n[k] for k in nobias),
        "new with producers_only (filters + γ, raw sums)": sum(terms[k] for k in prod if k in nobias),
        "new (every weight but biases, raw sums)": sum(terms[k] for k in nobias),
    }


# -------------------------------------------------------------------------------------- helpers
def jaccard(a: set, b: set) -> float:
    return len(a & b) / max(len(a | b), 1)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(float)
    rb = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(float)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def lowest(scores: np.ndarray, k: int) -> set[int]:
    return {int(i) for i in np.argsort(scores, kind="stable")[:k]}


def widths(model: nn.Module) -> dict[str, int]:
    """Output channels / features of every conv and linear layer."""
    return {
        n: int(m.weight.shape[0]) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    }


def tp_pruner(model: nn.Module, example: torch.Tensor, ratio: float) -> Any:
    fc = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    return tp.pruner.MagnitudePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=fc,
    )


def tp_apply(model: nn.Module, example: torch.Tensor, ratio: float) -> nn.Module:
    tp_pruner(model, example, ratio).step()
    return model


def tp_selection(model: nn.Module, example: torch.Tensor, ratio: float) -> dict[str, dict]:
    """Torch-Pruning's choice at ``ratio`` without pruning: ``{root module: {"pruned", "scores", "out"}}``
    (``out``: the root's output channels are pruned; ``scores``: its importance over all root indices)."""
    pr = tp_pruner(model, example, ratio)
    names = {m: n for n, m in model.named_modules()}
    out = {}
    for grp in pr.step(interactive=True):
        dep, idxs = grp[0]
        mod, handler = dep.target.module, dep.handler
        is_out = pr.DG.is_out_channel_pruning_fn(handler)
        n = pr.DG.get_out_channels(mod) if is_out else pr.DG.get_in_channels(mod)
        full = pr.DG.get_pruning_group(mod, handler, list(range(n)))
        scores = pr.importance(full).double().cpu().numpy()
        out[names[mod]] = {"pruned": sorted(int(i) for i in idxs), "scores": scores, "out": is_out}
    return out


def group_of(graph: DependencyGraph, module: str, out: bool) -> int | None:
    for gi, g in enumerate(graph.groups):
        for m in g.members:
            if m.name == f"{module}.weight" and (m.dim == 0) == out:
                return gi
    return None


# ------------------------------------------------------------------------------------ 1. analysis
def analyse(bench: T.Bench, spec: str, seed: int, ratio: float) -> list[dict]:
    """Group-by-group comparison of the channels Torch-Pruning and secateur's l1 keep at ``ratio``."""
    dense, _ = bench.dense(spec, seed)
    model = copy.deepcopy(dense).eval()
    x = bench.example
    graph = DependencyGraph.build(model, x)
    sel = tp_selection(copy.deepcopy(model), x, ratio)
    rows = []
    for root, rec in sel.items():
        gi = group_of(graph, root, rec["out"])
        if gi is None:
            continue
        g = graph.groups[gi]
        k = len(rec["pruned"])
        tp_kept = set(range(g.n_units)) - set(rec["pruned"])
        old = old_l1_scores(g, model)
        new = lp_scores(g, model, 1.0)
        kept = {name: set(range(g.n_units)) - lowest(s, k) for name, s in ablation_scores(g, model).items()}
        rows.append(
            {
                "model": spec,
                "seed": seed,
                "ratio": ratio,
                "group": g.name,
                "tp_root": root,
                "n_units": g.n_units,
                "tp_width": g.n_units - k,
                "secateur_width": g.n_units - int(math.floor(ratio * g.n_units + 1e-9)),
                "jaccard_kept_old": jaccard(tp_kept, set(range(g.n_units)) - lowest(old, k)),
                "jaccard_kept_new": jaccard(tp_kept, set(range(g.n_units)) - lowest(new, k)),
                "spearman_old": spearman(old, rec["scores"]),
                "spearman_new": spearman(new, rec["scores"]),
                "ablation_jaccard": {name: jaccard(tp_kept, kp) for name, kp in kept.items()},
                "scores": {"tp": rec["scores"].tolist(), "old": old.tolist(), "new": new.tolist()},
            }
        )
    return rows


# ------------------------------------------------------------------------------------ 2. accuracy
def closest_removal(cp: ChannelPruner, scores: dict, fraction: float, span: float = 0.05) -> dict:
    """The :func:`uniform_removal_for` removal whose removed MAC fraction is closest to ``fraction`` (log
    of the remaining MACs), over targets ``fraction ± span`` in steps of 0.0025: the scan over a knob that
    tradeoff.py does for Torch-Pruning's ratio, here over secateur's MAC target (a small net's removals
    move in steps of a channel; the closest may lie below the target)."""
    groups, best, best_err = cp.graph.groups, {}, math.inf
    for t in np.linspace(max(fraction - span, 0.0), min(fraction + span, 0.99), 41):
        rm = uniform_removal_for(groups, scores, cp.removed, cp.cost, float(t), cp.round_to)
        err = abs(math.log((1 - cp.cost.state(rm).removed_fraction()) / (1 - fraction)))
        if err < best_err - 1e-12:
            best, best_err = rm, err
    return best


def counts_removal(cp: ChannelPruner, scores: dict, counts: dict[str, int]) -> dict:
    """``counts[root module]`` lowest-scoring units of the group whose output that module produces (the
    widths Torch-Pruning chose), every member kept non-empty."""
    out = {}
    for root, k in counts.items():
        gi = group_of(cp.graph, root, True)
        if gi is not None and gi in scores and k:
            g = cp.graph.groups[gi]
            rm = np.sort(np.argsort(scores[gi], kind="stable")[:k])
            out[gi] = ensure_member_nonempty(g, rm, scores[gi])
    return out


def secateur_prune(
    model: nn.Module, x: torch.Tensor, criterion: Any, fraction: float, how: str, counts: dict | None = None
) -> nn.Module:
    """Remove ``fraction`` of the MACs by ``criterion``'s scores, compacted under the oracle. ``how``:
    ``"widths"`` (Torch-Pruning's per-group ``counts``), ``"closest"`` (:func:`closest_removal`) or
    ``"pruner"`` (``ChannelPruner.select``: the smallest common fraction reaching the target)."""
    cp = ChannelPruner(model, x, schedule=fraction, criterion=criterion, allocation="uniform", target="macs")
    try:
        if how == "pruner":
            removed = cp.select(fraction)
        elif how == "closest":
            removed = closest_removal(cp, cp.scores(), fraction)
        else:
            removed = counts_removal(cp, cp.scores(), counts or {})
    finally:
        cp.close()
    removed = {gi: rm for gi, rm in removed.items() if rm.size}
    model, _ = remove_units(model, cp.graph, removed, x, verify=True)
    return model


def tp_for_target(dense: nn.Module, x: torch.Tensor, reduction: float) -> tuple[float, float, dict]:
    """Torch-Pruning's grid ratio closest to ``reduction`` (tradeoff.py's scan), the MAC reduction it
    reaches and its selection there (:func:`tp_selection`)."""
    total = count_macs(dense, x)["macs"]

    def macs_at(ratio: float) -> float:
        return count_macs(tp_apply(copy.deepcopy(dense), x, ratio), x)["macs"]

    ratio = T._ratio_for(macs_at, total / reduction)
    return ratio, total / macs_at(ratio), tp_selection(copy.deepcopy(dense), x, ratio)


def point(
    bench: T.Bench, dense: nn.Module, dinfo: dict, method: str, reduction: float, seed: int, tp_choice: tuple
) -> dict:
    """One pruned, fine-tuned, evaluated model; ``tp_choice``: :func:`tp_for_target`'s result."""
    x = bench.example
    model = copy.deepcopy(dense)
    model.train()
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    if method == "tp-magnitude":
        model = tp_apply(model, x, tp_choice[0])
    else:
        crit = old_l1_scores if method.startswith("secateur-old") else "l1"
        how = method.rpartition("@")[2]
        frac = 1.0 - 1.0 / (reduction if how == "target" else tp_choice[1])
        how = {"target": "pruner", "tp": "closest", "tp-widths": "widths"}[how]
        counts = {root: len(r["pruned"]) for root, r in tp_choice[2].items() if r["out"]}
        model = secateur_prune(model, x, crit, frac, how, counts)
    prune_s = time.perf_counter() - t0
    oneshot = T.evaluate(model, bench.xte, bench.yte)
    bench.finetune(model, seed)
    acc = T.evaluate(model, bench.xte, bench.yte)
    macs = count_macs(model, x)["macs"]
    return {
        "model": dinfo["model"],
        "target_macs_x": reduction,
        "method": method,
        "seed": seed,
        "achieved_macs_x": dinfo["macs"] / macs,
        "params": count_params(model)["params"],
        "widths": widths(model),
        "accuracy_oneshot": oneshot,
        "accuracy": acc,
        "dense_accuracy": dinfo["accuracy"],
        "prune_s": prune_s,
        "wall_s": time.perf_counter() - t0,
    }


def summarise(points: list[dict]) -> list[dict]:
    keys = sorted({(p["model"], p["target_macs_x"], p["method"]) for p in points})
    out = []
    for model, red, method in keys:
        ps = [p for p in points if (p["model"], p["target_macs_x"], p["method"]) == (model, red, method)]
        acc = [p["accuracy"] * 100 for p in ps]
        out.append(
            {
                "model": model,
                "target_macs_x": red,
                "method": method,
                "seeds": len(ps),
                "accuracy_mean": statistics.fmean(acc),
                "accuracy_median": statistics.median(acc),
                "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "accuracy_oneshot_mean": statistics.fmean(p["accuracy_oneshot"] * 100 for p in ps),
                "achieved_macs_x_mean": statistics.fmean(p["achieved_macs_x"] for p in ps),
            }
        )
    return out


def checks(summary: list[dict]) -> list[dict]:
    """For ``secateur-default@tp-widths`` and ``secateur-default@tp``: mean accuracy >= ``tp-magnitude``'s
    - 0.1 point with achieved MACs within 3% of Torch-Pruning's (issue 14's bar)."""
    by = {(s["model"], s["target_macs_x"], s["method"]): s for s in summary}
    out = []
    for (model, red, method), s in sorted(by.items()):
        if method != "tp-magnitude":
            continue
        for ours_name in ("secateur-default@tp-widths", "secateur-default@tp"):
            if (model, red, ours_name) not in by:
                continue
            ours = by[(model, red, ours_name)]
            gap = ours["accuracy_mean"] - s["accuracy_mean"]
            macs_rel = ours["achieved_macs_x_mean"] / s["achieved_macs_x_mean"] - 1
            out.append(
                {
                    "model": model,
                    "target_macs_x": red,
                    "method": ours_name,
                    "secateur_minus_tp_pt": gap,
                    "achieved_macs_rel_diff": macs_rel,
                    "pass": gap >= -0.1 and abs(macs_rel) <= 0.03,
                }
            )
    return out


# ----------------------------------------------------------------------------------------- tables
def markdown(res: dict) -> list[str]:
    """The tables of docs/tradeoff.md's section from a results JSON (``--markdown``)."""
    lines = [
        "| model | group | channels | TP width | secateur width | Jaccard old | Jaccard new | Spearman old |"
        " Spearman new |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = res["analysis"]
    for spec in dict.fromkeys(r["model"] for r in rows):
        for group in dict.fromkeys(r["group"] for r in rows if r["model"] == spec):
            rs = [r for r in rows if r["model"] == spec and r["group"] == group]
            jo, jn = (statistics.fmean(r[k] for r in rs) for k in ("jaccard_kept_old", "jaccard_kept_new"))
            so, sn = (statistics.fmean(r[k] for r in rs) for k in ("spearman_old", "spearman_new"))
            tw = sorted({r["tp_width"] for r in rs})
            sw = sorted({r["secateur_width"] for r in rs})
            lines.append(
                f"| {spec.split(':')[0]} | `{group}` | {rs[0]['n_units']} | {'/'.join(map(str, tw))} | "
                f"{'/'.join(map(str, sw))} | {jo:.2f} | {jn:.2f} | {so:.2f} | {sn:.2f} |"
            )
    names = list(rows[0]["ablation_jaccard"])
    lines += ["", "| variant | " + " | ".join(dict.fromkeys(r["model"].split(":")[0] for r in rows)) + " |",
              "| --- |" + " ---: |" * len(dict.fromkeys(r["model"] for r in rows))]
    for name in names:
        cells = []
        for spec in dict.fromkeys(r["model"] for r in rows):
            vals = [r["ablation_jaccard"][name] for r in rows if r["model"] == spec]
            cells.append(f"{statistics.fmean(vals):.2f} ({min(vals):.2f}-{max(vals):.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    summ = res.get("summary", [])
    methods = [m for m in METHODS if any(s["method"] == m for s in summ)]
    lines += ["", "| model | target | " + " | ".join(methods) + " |"]
    lines.append("| --- | ---: |" + " ---: |" * len(methods))
    for spec in dict.fromkeys(s["model"] for s in summ):
        for red in sorted({s["target_macs_x"] for s in summ if s["model"] == spec}):
            cells = []
            for m in methods:
                key = (spec, red, m)
                s = next((s for s in summ if (s["model"], s["target_macs_x"], s["method"]) == key), None)
                cells.append(
                    "—" if s is None else f"{s['accuracy_mean']:.1f} ± {s['accuracy_std']:.1f} "
                    f"(median {s['accuracy_median']:.1f}) [{s['achieved_macs_x_mean']:.2f}x]"
                )
            lines.append(f"| {spec.split(':')[0]} | {red:g}x | " + " | ".join(cells) + " |")
    return lines


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--mac-targets", nargs="+", type=float, default=[2.0, 3.0, 4.0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--ratio", type=float, default=0.5, help="per-layer ratio of the channel analysis")
    ap.add_argument("--train-subset", type=int, default=20000)
    ap.add_argument("--dense-epochs", type=int, default=3)
    ap.add_argument("--ft-steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=str(ROOT / "benchmarks" / "cache"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "l1_vs_tp.json"))
    ap.add_argument("--markdown", action="store_true", help="only print the tables of --out (Markdown)")
    args = ap.parse_args(argv)
    if args.markdown:
        print("\n".join(markdown(json.loads(Path(args.out).read_text()))))
        return 0
    if tp is None:
        print("torch_pruning is not installed", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    cfg = {
        **T.FULL,
        "models": args.models,
        "seeds": args.seeds,
        "mac_targets": args.mac_targets,
        "train_subset": args.train_subset,
        "test_subset": None,
        "dense_epochs": args.dense_epochs,
        "dense_lr": 0.1,
        "ft_steps": args.ft_steps,
        "ft_lr": 0.01,
        "batch_size": 128,
        "threads": args.threads,
        "cache_dir": args.cache_dir,
        "ratio": args.ratio,
        "methods": {m: METHODS[m] for m in args.methods},
        "command": "python benchmarks/l1_vs_tp.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    bench = T.Bench(cfg)
    t_start = time.perf_counter()
    res: dict[str, Any] = {
        "config": cfg,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_pruning": importlib.metadata.version("torch-pruning"),
            "platform": platform.platform(),
            **T.git_state(),
        },
        "analysis": [],
        "points": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        res["summary"] = summarise(res["points"]) if res["points"] else []
        res["checks"] = checks(res["summary"])
        res["total_wall_s"] = time.perf_counter() - t_start
        out.write_text(json.dumps(res, indent=1))

    for spec in args.models:
        for seed in args.seeds:
            res["analysis"] += analyse(bench, spec, seed, args.ratio)
    save()
    for spec in args.models:
        for seed in args.seeds:
            dense, dinfo = bench.dense(spec, seed)
            for red in args.mac_targets:
                tp_choice = tp_for_target(dense, bench.example, red)
                for method in args.methods:
                    p = point(bench, dense, dinfo, method, red, seed, tp_choice)
                    res["points"].append(p)
                    T.log(
                        f"{spec} seed {seed} {red}x {method}: {p['accuracy']:.4f} "
                        f"[{p['achieved_macs_x']:.2f}x] ({p['wall_s']:.0f}s)"
                    )
                    save()
    save()
    for c in res["checks"]:
        T.log(f"check {c}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
