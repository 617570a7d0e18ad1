"""Training-time pruning methods on Fashion-MNIST next to magnitude and random: equal step budgets, 3 seeds.

    python benchmarks/methods.py --out benchmarks/results/methods.json --resume   # the documented run
    python benchmarks/methods.py --quick                                            # smoke run, minutes
    python benchmarks/methods.py --table benchmarks/results/methods.json            # markdown tables only

Protocol (data subsets and short schedules so that it runs on one CPU core; the figures compare methods
under one protocol, they are not the papers' numbers):

* Data: the first ``--train`` training and ``--test`` test images of Fashion-MNIST (normalised), batch
  ``--batch-size``; every training phase draws its batches from the same seeded loader
  (:class:`secateur.data.StepLoader`), so all methods of one seed see the same batch sequence.
* Dense parents per seed: LeNet-5, VGG-11-BN (width ``--vgg-width``) and ResNet-8 (width ``--resnet-width``,
  stem stride 2), ``--dense-steps`` SGD steps each (cached under ``benchmarks/cache/methods`` for resume).
* **Equal budgets**: after the dense phase every method gets exactly ``--budget`` optimizer steps in total.
  Methods with a phase of their own (ADMM, movement, slimming, SCOP's β, Fisher's removal phase) spend
  ``--method-steps`` of them there and the rest fine-tuning; one-shot methods (magnitude, random, L1,
  redundant) fine-tune for all ``--budget`` steps; FBS trains its gates and weights for ``--budget`` steps.
  Every phase is SGD (momentum 0.9, weight decay 5e-4, cosine LR from ``--lr``) except movement's score
  phase (Adam, as in Sanh et al.) and SCOP's β (Adam on β only, network frozen). The knockoff VAE of SCOP
  is a separate generator; its training steps are reported, not counted.
* Unstructured (LeNet-5, ``--sparsity`` of every conv/linear weight): magnitude and random masks per layer;
  ADMM (Zhang et al. 2018: ADMM phase, hard prune, masked retraining); hard movement (Sanh et al. 2020:
  cubic schedule to the sparsity over 80% of its phase, then masked fine-tuning).
* Channels (VGG, ``--ratio`` of the channels of every group removed physically through the dependency
  graph): L1 filter norm and random per group; network slimming (Liu et al. 2017: λ·sign(γ) subgradient,
  then one global |γ| threshold); SCOP (Tang et al. 2020); redundant features (Ayinde & Zurada 2018);
  Fisher pruning (Crowley et al. 2018: one channel at a time, as many as L1 removes, spread over the
  method phase; when there are more channels than method steps, one per step and the phase is longer).
* FBS (Gao et al. 2019), density ``--fbs-density``, stem not gated: on the VGG and on the ResNet-8 (every
  residual block's convs gated after BN, before the add). Reported: accuracy, mean per-sample MACs of the
  gated convs and of the whole network vs dense, batch-1 latency of the masked and the skipping path.
* Similarity of each channel-pruned VGG to its dense parent (gradient CKA, Tang et al. 2020; activation
  CKA of the logits) on 64 test images.

Results are written after every row; ``--resume`` keeps the rows of a previous run with the same
configuration and runs only the missing ones. Tables give mean ± std (sample std, n-1) over seeds.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from secateur.analysis.counting import count_macs, count_params  # noqa: E402
from secateur.analysis.similarity import similarity_report  # noqa: E402
from secateur.data import fashion_mnist_loaders  # noqa: E402
from secateur.data.loader import StepLoader  # noqa: E402
from secateur.masks import detach_masks, set_mask  # noqa: E402
from secateur.masks.patterns import layer_mask  # noqa: E402
from secateur.methods.admm import ADMM  # noqa: E402
from secateur.methods.fbs import FBS  # noqa: E402
from secateur.methods.fisher_prune import FisherPruner  # noqa: E402
from secateur.methods.movement import Movement  # noqa: E402
from secateur.methods.redundant import prune_redundant  # noqa: E402
from secateur.methods.scop import SCOP, train_knockoff_vae  # noqa: E402
from secateur.methods.slimming import SlimmingPenalty, slim  # noqa: E402
from secateur.pruners.oneshot import prune_channels  # noqa: E402
from secateur.scope import Scope  # noqa: E402
from secateur.train import Trainer  # noqa: E402
from secateur.zoo import create_model  # noqa: E402

X1 = torch.zeros(1, 1, 28, 28)
CACHE = Path(__file__).resolve().parent / "cache" / "methods"
CONFIG_KEYS = (
    "train",
    "test",
    "batch_size",
    "dense_steps",
    "budget",
    "method_steps",
    "lr",
    "sparsity",
    "ratio",
    "slim_lambda",
    "fbs_density",
    "vgg_width",
    "resnet_width",
)


# ------------------------------------------------------------------------------------------- helpers
def train(model, base_loader, steps: int, lr: float, callbacks=()) -> Trainer | None:
    """``steps`` SGD steps (cosine LR) over ``base_loader``'s batches from its epoch 0; None if steps == 0."""
    if steps <= 0:
        return None
    t = Trainer(
        model,
        StepLoader(base_loader, steps),
        epochs=1,
        lr=lr,
        callbacks=list(callbacks),
        progress=False,
        weight_decay=5e-4,
        log_every=0,
    )
    t.fit()
    return t


@torch.no_grad()
def evaluate(model, loader) -> float:
    model.eval()
    correct = seen = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        seen += y.numel()
    return correct / seen


def kept(model, dense) -> dict[str, float]:
    p, pd = count_params(model), count_params(dense)
    m, md = count_macs(model, X1), count_macs(dense, X1)
    return {
        "params_kept": round(p["nonzero_params"] / pd["params"], 4),
        "macs_kept": round(m["sparse_macs"] / md["macs"], 4),
    }


def config_hash(args) -> str:
    cfg = {k: getattr(args, k) for k in CONFIG_KEYS}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]


def dense_model(name: str, seed: int, loaders, args) -> tuple[torch.nn.Module, float]:
    """Train (or load from the cache) the dense parent ``name`` of ``seed``; returns (model, accuracy)."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(seed)
    if name == "lenet5":
        model = create_model("lenet5")
    elif name == "vgg":
        model = create_model("vgg_small", width=args.vgg_width)
    else:
        model = create_model("resnet8", width=args.resnet_width, stem_stride=2)
    path = CACHE / f"{name}_{config_hash(args)}_s{seed}.safetensors"
    if args.resume and path.exists():
        model.load_state_dict(load_file(str(path)))
    else:
        train(model, loaders[0], args.dense_steps, lr=0.05)
        CACHE.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, evaluate(model, loaders[1])


# --------------------------------------------------------------------------------------- the methods
def unstructured(method: str, dense, loaders, args, seed: int) -> dict:
    sp, budget, ms, lr = args.sparsity, args.budget, args.method_steps, args.lr
    m = copy.deepcopy(dense)
    extra: dict[str, Any] = {}
    if method in ("magnitude", "random"):
        torch.manual_seed(seed)
        for t in Scope().resolve(m):
            w = t.module.weight.detach()
            s = w.abs() if method == "magnitude" else torch.rand_like(w)
            set_mask(t.module, layer_mask(s, sp, t.name))
        ms = 0
    elif method == "ADMM":
        admm = ADMM(m, sparsity=sp, rho=1e-3, rho_growth=2.4, rho_max=1.0, update_every=max(1, ms // 8))
        train(m, loaders[0], ms, lr, callbacks=[admm])
        admm.finalize()
        extra["primal_residual"] = round(admm.primal_residual(), 4)
        extra["rho_final"] = admm.rho
    elif method == "movement (hard)":
        mv = Movement(m, sparsity=sp, mode="hard", start=0, end=max(1, int(0.8 * ms)), every=max(1, ms // 20))
        weights = [p for n, p in m.named_parameters() if "scores" not in n]
        opt = torch.optim.Adam([{"params": weights, "lr": 1e-3}, {"params": mv.scores(), "lr": 1e-2}])
        m.train()
        for step, (x, y) in enumerate(StepLoader(loaders[0], ms), start=1):
            loss = F.cross_entropy(m(x), y) + mv.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
            mv.update(step)
        mv.finalize()
    else:
        raise ValueError(method)
    train(m, loaders[0], budget - ms, lr)
    acc = evaluate(m, loaders[1])
    return {
        "accuracy": acc,
        **kept(detach_masks(m), dense),
        "method_steps": ms,
        "ft_steps": budget - ms,
        **extra,
    }


def channels(method: str, dense, loaders, args, seed: int, l1_removed: int) -> dict:
    r, budget, ms, lr = args.ratio, args.budget, args.method_steps, args.lr
    m = copy.deepcopy(dense)
    extra: dict[str, Any] = {}
    if method in ("L1 norm", "random"):
        _, plan = prune_channels(
            m, X1, sparsity=r, criterion="l1" if method == "L1 norm" else "random", seed=seed
        )
        extra["channels_removed"] = sum(len(g["removed"]) for g in plan["groups"])
        ms = 0
    elif method == "network slimming":
        train(m, loaders[0], ms, lr, callbacks=[SlimmingPenalty(m, lam=args.slim_lambda)])
        slim(m, X1, sparsity=r)
    elif method == "SCOP":
        vae_steps = max(1, ms)
        vae = train_knockoff_vae(
            StepLoader(loaders[0], vae_steps), epochs=1, latent=16, hidden=256, seed=seed
        )
        scop = SCOP(m, knockoff=vae)
        scop.fit(StepLoader(loaders[0], ms), steps=ms, lr=0.02)
        scop.prune(X1, sparsity=r, allocation="uniform")
        extra["vae_steps_not_counted"] = vae_steps
    elif method == "redundant features":
        prune_redundant(m, X1, sparsity=r)
        ms = 0
    elif method == "Fisher (one at a time)":
        n = min(l1_removed, budget)  # as many channels as L1 removes, one per optimizer step at most
        every = max(1, ms // max(n, 1))  # spread over the method phase (longer if n > method steps)
        fp = FisherPruner(m, X1, every=every, total=n)
        train(m, loaders[0], n * every, lr, callbacks=[fp])
        extra["channels_removed"] = len(fp.removed)
        ms = n * every
    else:
        raise ValueError(method)
    train(m, loaders[0], budget - ms, lr)
    acc = evaluate(m, loaders[1])
    xs, ys = next(iter(loaders[1]))
    m.eval()
    dense.eval()
    sim = similarity_report(dense, m, xs[:64], ys[:64])
    return {
        "accuracy": acc,
        **kept(m, dense),
        **{k: round(v, 4) for k, v in sim.items()},
        "method_steps": ms,
        "ft_steps": budget - ms,
        **extra,
    }


def fbs_run(dense, loaders, args, stem: str) -> dict:
    m = copy.deepcopy(dense)
    fbs = FBS(m, X1.repeat(2, 1, 1, 1), density=args.fbs_density, lam=1e-4, exclude=[stem])
    train(m, loaders[0], args.budget, args.lr, callbacks=[fbs])
    acc = evaluate(m, loaders[1])
    x, _ = next(iter(loaders[1]))
    macs = fbs.macs_per_sample(x[:256])
    lat = fbs.latency(x[:1], repeats=20)
    dense_macs = count_macs(dense, X1)["macs"]
    gated_mean = float(macs["gated"].double().mean())
    return {
        "accuracy": acc,
        "gated_layers": len(fbs.layers),
        "gated_conv_macs_ratio": round(macs["ratio"], 4),
        "network_macs_kept_per_sample": round((dense_macs - macs["dense"] + gated_mean) / dense_macs, 4),
        "latency_b1_masked_ms": round(lat["masked"]["median_ms"], 3),
        "latency_b1_skip_ms": round(lat["skip"]["median_ms"], 3),
        "method_steps": args.budget,
        "ft_steps": 0,
    }


# ------------------------------------------------------------------------------------------ the run
UNSTRUCTURED = ("magnitude", "random", "ADMM", "movement (hard)")
CHANNELS = ("L1 norm", "random", "network slimming", "SCOP", "redundant features", "Fisher (one at a time)")


def run(args) -> dict:
    out = args.out
    results: dict[str, Any] = {"config": {k: getattr(args, k) for k in CONFIG_KEYS}, "rows": [], "dense": []}
    results["config"]["config_hash"] = config_hash(args)
    if args.resume and out is not None and out.exists():
        old = json.loads(out.read_text())
        if old.get("config", {}).get("config_hash") == results["config"]["config_hash"]:
            results["rows"], results["dense"] = old.get("rows", []), old.get("dense", [])
            print(f"resuming: {len(results['rows'])} rows already done", flush=True)
    done = {(r["seed"], r["setting"], r["method"]) for r in results["rows"]}
    dense_done = {(d["seed"], d["model"]) for d in results["dense"]}

    def save() -> None:
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            results["environment"] = {
                "torch": torch.__version__,
                "python": platform.python_version(),
                "cpu": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(),
            }
            out.write_text(json.dumps(results, indent=2) + "\n")

    def add(seed: int, setting: str, method: str, fn, *fargs) -> dict:
        key = (seed, setting, method)
        if key in done:
            return next(r for r in results["rows"] if (r["seed"], r["setting"], r["method"]) == key)
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        row = {"seed": seed, "setting": setting, "method": method, **fn(*fargs)}
        row["accuracy"] = round(row["accuracy"], 4)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        results["rows"].append(row)
        done.add(key)
        print(json.dumps(row), flush=True)
        save()
        return row

    for seed in args.seeds:
        train_l, _ = fashion_mnist_loaders(batch_size=args.batch_size, subset=args.train, seed=seed)
        _, test_l = fashion_mnist_loaders(batch_size=args.batch_size, subset=args.test, seed=seed)
        loaders = (train_l, test_l)
        parents = {}
        for name in ("lenet5", "vgg", "resnet8"):
            t0 = time.perf_counter()
            parents[name], acc = dense_model(name, seed, loaders, args)
            if (seed, name) not in dense_done:
                results["dense"].append({"seed": seed, "model": name, "accuracy": round(acc, 4)})
                dense_done.add((seed, name))
                save()
            print(f"seed {seed} dense {name} {acc:.4f} ({time.perf_counter() - t0:.1f}s)", flush=True)
        lenet, vgg, resnet = parents["lenet5"], parents["vgg"], parents["resnet8"]
        for method in UNSTRUCTURED:
            add(seed, "unstructured", method, unstructured, method, lenet, loaders, args, seed)
        l1 = add(seed, "channels", "L1 norm", channels, "L1 norm", vgg, loaders, args, seed, 0)
        for method in CHANNELS[1:]:
            add(seed, "channels", method, channels, method, vgg, loaders, args, seed, l1["channels_removed"])
        add(seed, "fbs", "FBS on VGG", fbs_run, vgg, loaders, args, "features.0")
        add(seed, "fbs", "FBS on ResNet-8", fbs_run, resnet, loaders, args, "conv1")
    return results


# ------------------------------------------------------------------------------------------- tables
def _ms(values: list[float], digits: int = 4) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def tables(results: dict) -> str:
    """Markdown tables (mean ± std over seeds) from a results dict."""
    rows = results["rows"]
    seeds = sorted({r["seed"] for r in rows})
    dense = {}
    for d in results.get("dense", []):
        dense.setdefault(d["model"], []).append(d["accuracy"])
    lines = [f"Seeds: {seeds}. Dense accuracy: " + ", ".join(f"{k} {_ms(v)}" for k, v in dense.items()) + "."]

    def table(setting: str, cols: list[tuple[str, str, int]]) -> None:
        methods = list(dict.fromkeys(r["method"] for r in rows if r["setting"] == setting))
        if not methods:
            return
        lines.append("")
        lines.append("| method | " + " | ".join(c[0] for c in cols) + " | method steps | ft steps | n |")
        lines.append("| --- |" + " --- |" * (len(cols) + 3))
        for meth in methods:
            rs = [r for r in rows if r["setting"] == setting and r["method"] == meth]
            cells = [_ms([r[c[1]] for r in rs if c[1] in r], c[2]) for c in cols]
            steps = sorted({r["method_steps"] for r in rs})
            ft = sorted({r["ft_steps"] for r in rs})
            lines.append(
                f"| {meth} | " + " | ".join(cells) + f" | {'/'.join(map(str, steps))} | "
                f"{'/'.join(map(str, ft))} | {len(rs)} |"
            )

    acc = ("accuracy", "accuracy", 4)
    table("unstructured", [acc, ("params kept", "params_kept", 3), ("MACs kept", "macs_kept", 3)])
    table(
        "channels",
        [
            acc,
            ("params kept", "params_kept", 3),
            ("MACs kept", "macs_kept", 3),
            ("gradient CKA", "gradient_cka", 3),
            ("activation CKA", "activation_cka", 3),
        ],
    )
    table(
        "fbs",
        [
            acc,
            ("gated-conv MACs / dense", "gated_conv_macs_ratio", 3),
            ("network MACs / dense", "network_macs_kept_per_sample", 3),
            ("latency b=1 masked (ms)", "latency_b1_masked_ms", 2),
            ("latency b=1 skip (ms)", "latency_b1_skip_ms", 2),
        ],
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=6000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dense-steps", type=int, default=1000)
    ap.add_argument("--budget", type=int, default=1000, help="optimizer steps per method after dense")
    ap.add_argument("--method-steps", type=int, default=500, help="of --budget, for a method's own phase")
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--sparsity", type=float, default=0.8, help="unstructured: fraction of weights removed")
    ap.add_argument("--ratio", type=float, default=0.5, help="channels: fraction removed per group")
    ap.add_argument("--slim-lambda", type=float, default=1e-3)
    ap.add_argument("--fbs-density", type=float, default=0.5)
    ap.add_argument("--vgg-width", type=float, default=0.125)
    ap.add_argument("--resnet-width", type=float, default=0.5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (one seed)")
    ap.add_argument("--resume", action="store_true", help="keep the rows of --out with the same config")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table", type=Path, default=None, help="print the markdown tables of a results file")
    args = ap.parse_args()
    if args.table is not None:
        print(tables(json.loads(args.table.read_text())))
        return
    if args.budget < args.method_steps or args.method_steps < 1:
        ap.error("need 1 <= --method-steps <= --budget")
    if args.quick:
        args.train, args.test, args.dense_steps, args.budget, args.method_steps = 1024, 256, 20, 20, 10
        args.ratio, args.seeds = 0.1, args.seeds[:1]
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = run(args)
    results["total_seconds_this_invocation"] = round(time.perf_counter() - start, 1)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(tables(results))
    print("total seconds", results["total_seconds_this_invocation"])


if __name__ == "__main__":
    main()
