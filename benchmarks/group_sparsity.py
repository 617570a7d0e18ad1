"""Group-sparse training before removal versus one-shot removal, at an equal training budget (issue 14).

    python benchmarks/group_sparsity.py --threads 1 --out benchmarks/results/group_sparsity.json

Fashion-MNIST, ``resnet8:width=0.5,stem_stride=2`` (the zoo's ResNet-8 at half width, stride-2 stem). For each
seed a dense network is trained once (first ``--train-subset`` training images, ``--dense-epochs`` epochs,
SGD lr 0.1 cosine, batch 128; cached under ``benchmarks/cache/``, never committed). From the same dense
weights, for each MAC target (2x, 4x) and each arm, with the same ``--budget`` optimizer steps on the *same*
batches (batch 128):

* ``l1-oneshot``: the structured driver removes the target by the L1 filter norm (``ChannelPruner``,
  ``criterion="l1"``, uniform allocation, ``target="macs"``), then fine-tunes ``budget`` steps.
* ``l1-depgraph``: :class:`secateur.GroupSparsityPenalty` (DepGraph's group-level sparse learning with the
  same criterion, allocation and target) for ``--sparse-steps`` steps, removal by the driver, then
  ``budget - sparse_steps`` fine-tuning steps.
* ``l1-greg``: :class:`secateur.GrowingRegularization` (GReg-1: the same L1 choice made first, its units
  pushed to zero by a growing L2 penalty) for ``--sparse-steps`` steps, removal, then the rest.

Fine-tuning: SGD momentum 0.9, lr ``--lr`` cosine, weight decay 5e-4 (as benchmarks/tradeoff.py); the sparse
phase: the same optimizer at constant ``--lr``. BatchNorm statistics are those training leaves (the same for
every arm). Accuracy: the full 10k test set (``--eval val``: 10k held-out training images 50k-60k instead,
for choosing hyperparameters without the test set). Each row also records the accuracy right after removal
(before fine-tuning), the achieved MAC reduction, the parameter count, and for the sparse arms the largest
and mean norm ``||w_{g,k}||_2`` of the removed units against the mean of the kept ones.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import secateur  # noqa: E402
from secateur.analysis.counting import count_macs, count_params  # noqa: E402
from secateur.data.fashion_mnist import load_fashion_mnist, normalize_fashion_mnist  # noqa: E402
from secateur.methods.group_sparsity import unit_norms  # noqa: E402
from secateur.train import Trainer  # noqa: E402
from secateur.zoo import create_model  # noqa: E402

MODEL = ("resnet8", {"width": 0.5, "stem_stride": 2})
MODEL_SPEC = "resnet8:width=0.5,stem_stride=2"
ARMS = ("l1-oneshot", "l1-depgraph", "l1-greg")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    was = model.training
    model.eval()
    correct = sum(
        int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch)
    )
    model.train(was)
    return correct / len(x)


def train(model: nn.Module, batches: Any, lr: float, schedule: str, callbacks: tuple = ()) -> float:
    """SGD (momentum 0.9, wd 5e-4) over ``batches`` (one step each); returns the wall time in seconds."""
    t0 = time.perf_counter()
    Trainer(
        model,
        batches,
        epochs=1,
        lr=lr,
        lr_schedule=schedule,
        weight_decay=5e-4,
        callbacks=list(callbacks),
        progress=False,
        log_every=0,
    ).fit()
    return time.perf_counter() - t0


class Batches:
    """A fixed list of index batches over ``(x, y)``, sliceable, materialised one batch at a time."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, idx: list[torch.Tensor]) -> None:
        self.x, self.y, self.idx = x, y, idx

    def __len__(self) -> int:
        return len(self.idx)

    def __iter__(self) -> Any:
        return ((self.x[i], self.y[i]) for i in self.idx)

    def __getitem__(self, s: slice) -> Batches:
        return Batches(self.x, self.y, self.idx[s])


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        xtr, ytr = load_fashion_mnist("train")
        xte, yte = load_fashion_mnist("test")
        xtr = normalize_fashion_mnist(xtr)
        self.xtr, self.ytr = xtr[: args.train_subset], ytr[: args.train_subset]
        if args.eval == "val":
            self.xev, self.yev = xtr[50_000:60_000], ytr[50_000:60_000]
        else:
            self.xev, self.yev = normalize_fashion_mnist(xte), yte
        self.example = self.xtr[:1].clone()
        self.cache = ROOT / "benchmarks" / "cache"

    def batches(self, seed: int, steps: int) -> Batches:
        """``steps`` shuffled batches of 128 (epochs reshuffled with ``seed + epoch``), built lazily."""
        n = len(self.xtr)
        order: list[torch.Tensor] = []
        epoch = 0
        while sum(len(o) for o in order) < steps * 128:
            order.append(torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)))
            epoch += 1
        idx = torch.cat(order)[: steps * 128].split(128)
        return Batches(self.xtr, self.ytr, list(idx))

    def dense(self, seed: int) -> tuple[nn.Module, dict]:
        a = self.args
        folder = self.cache / f"group_sparsity_resnet8h_s{seed}_n{a.train_subset}_e{a.dense_epochs}"
        info_file = folder / "bench.json"
        if info_file.exists():
            info = json.loads(info_file.read_text())
            log(f"dense seed {seed}: cached, test accuracy {info['test_accuracy']:.4f}")
            return secateur.load(folder), info
        torch.manual_seed(seed)
        model = create_model(MODEL[0], **MODEL[1])
        steps = a.dense_epochs * -(-a.train_subset // 128)
        t0 = time.perf_counter()
        Trainer(
            model,
            self.batches(seed, steps),
            epochs=1,
            lr=0.1,
            weight_decay=5e-4,
            progress=False,
            log_every=0,
        ).fit()
        xte, yte = load_fashion_mnist("test")
        info = {
            "seed": seed,
            "steps": steps,
            "train_s": time.perf_counter() - t0,
            "test_accuracy": evaluate(model, normalize_fashion_mnist(xte), yte),
            "macs": count_macs(model, self.example)["macs"],
            **count_params(model),
        }
        secateur.save(model, folder, metadata={"benchmark": "group_sparsity"})
        info_file.write_text(json.dumps(info, indent=1))
        log(f"dense seed {seed}: test accuracy {info['test_accuracy']:.4f} in {info['train_s']:.0f}s")
        return model, info

    def point(self, dense: nn.Module, dinfo: dict, arm: str, reduction: float, seed: int) -> dict:
        a = self.args
        sparsity = 1.0 - 1.0 / reduction
        batches = self.batches(1000 + seed, a.budget)
        model = copy.deepcopy(dense)
        model.train()
        torch.manual_seed(seed)
        common = {"criterion": "l1", "allocation": "uniform", "target": "macs"}
        extra: dict[str, Any] = {}
        t0 = time.perf_counter()
        if arm == "l1-oneshot":
            ft_batches = batches
            secateur.prune_channels(model, self.example, sparsity, **common)
        else:
            if arm == "l1-depgraph":
                reg: Any = secateur.GroupSparsityPenalty(
                    model, self.example, sparsity, lam=a.lam, alpha=a.alpha, power=a.power, **common
                )
            else:
                reg = secateur.GrowingRegularization(
                    model,
                    self.example,
                    sparsity,
                    delta=a.greg_delta,
                    every=a.greg_every,
                    ceiling=a.greg_ceiling,
                    **common,
                )
            train(model, batches[: a.sparse_steps], a.lr, "constant", (reg,))
            extra["accuracy_after_sparse_training"] = evaluate(model, self.xev, self.yev)
            kept_mean = float(
                np.mean(np.concatenate([unit_norms(model, reg.graph.groups[gi]) for gi in reg.group_ids]))
            )
            reg.finalize()
            removed = np.concatenate([np.asarray(v) for v in reg.removed_norms.values()])
            extra.update(
                {
                    "removed_norm_max": float(removed.max()),
                    "removed_norm_mean": float(removed.mean()),
                    "unit_norm_mean_before_removal": kept_mean,
                }
            )
            ft_batches = batches[a.sparse_steps :]
        acc0 = evaluate(model, self.xev, self.yev)
        train(model, ft_batches, a.lr, "cosine")
        acc = evaluate(model, self.xev, self.yev)
        macs = count_macs(model, self.example)["macs"]
        row = {
            "model": MODEL_SPEC,
            "target_macs_x": reduction,
            "method": arm,
            "seed": seed,
            "achieved_macs_x": dinfo["macs"] / macs,
            "params": count_params(model)["params"],
            "accuracy": acc,
            "accuracy_after_removal": acc0,
            "sparse_steps": 0 if arm == "l1-oneshot" else a.sparse_steps,
            "finetune_steps": len(ft_batches),
            "wall_s": time.perf_counter() - t0,
            **extra,
        }
        log(
            f"{arm:12s} {reduction:g}x seed {seed}: acc {acc:.4f} (after removal {acc0:.4f}), "
            f"MACs {row['achieved_macs_x']:.2f}x"
            + (f", removed norm max {extra['removed_norm_max']:.3g}" if extra else "")
        )
        return row


def git_state() -> dict[str, Any]:
    """The checkout's commit and the source files that differ from it (empty outside a git checkout)."""

    def run(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": run("rev-parse", "HEAD").strip(),
        "dirty_src": run("status", "--porcelain", "src").split("\n")[:-1],
    }


def summary(rows: list[dict]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        key = f"{r['method']}@{r['target_macs_x']:g}x"
        out.setdefault(key, {"accuracies": []})["accuracies"].append(r["accuracy"])  # type: ignore[union-attr]
    for v in out.values():
        accs = v.pop("accuracies")
        v["mean"] = float(np.mean(accs))  # type: ignore[arg-type]
        v["std"] = float(np.std(accs))  # type: ignore[arg-type]
        v["n"] = len(accs)  # type: ignore[arg-type]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--targets", type=float, nargs="+", default=[2.0, 4.0])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--train-subset", type=int, default=20000)
    p.add_argument("--dense-epochs", type=int, default=3)
    p.add_argument("--budget", type=int, default=300, help="optimizer steps after the dense model, every arm")
    p.add_argument("--sparse-steps", type=int, default=150, help="of the budget, with the penalty")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--lam", type=float, default=5e-3, help="DepGraph's lambda")
    p.add_argument("--alpha", type=float, default=4.0, help="DepGraph's alpha (gamma in [1, 2^alpha])")
    p.add_argument("--power", type=int, default=2, choices=(1, 2))
    p.add_argument("--greg-delta", type=float, default=0.05)
    p.add_argument("--greg-every", type=int, default=5)
    p.add_argument("--greg-ceiling", type=float, default=1.0)
    p.add_argument("--eval", choices=("test", "val"), default="test")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. the source commit)")
    args = p.parse_args(argv)
    if not 0 < args.sparse_steps < args.budget:
        p.error("--sparse-steps must be in (0, --budget)")
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    t0 = time.perf_counter()
    rows, dense_info = [], []
    for seed in args.seeds:
        dense, info = bench.dense(seed)
        dense_info.append(info)
        for reduction in args.targets:
            for arm in args.arms:
                rows.append(bench.point(dense, info, arm, reduction, seed))
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "command": "python benchmarks/group_sparsity.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "dense": dense_info,
        "rows": rows,
        "summary": summary(rows),
        "environment": {
            **git_state(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
        "total_wall_s": time.perf_counter() - t0,
        "note": args.note,
    }
    for key, v in result["summary"].items():
        log(f"{key:22s} {100 * v['mean']:.2f} ± {100 * v['std']:.2f} (n={v['n']})")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
