"""Accuracy versus compression on Fashion-MNIST for every criterion, at one fine-tuning budget (issue 4).

    python benchmarks/tradeoff.py --quick                       # ~10-15 min on 2 busy CPU cores
    python benchmarks/tradeoff.py                               # the full run (3 seeds; about a day)
    python benchmarks/tradeoff.py --name standard ...           # 3 seeds, small nets, ~1.5 h on one core
                                                                # (exact command: docs/benchmarks.md)
    python benchmarks/tradeoff.py ... --grasp-check out.json    # GraSP on trained weights, diagnostic
    python benchmarks/tradeoff.py --docs-only --out benchmarks/results/tradeoff_quick.json \
        --docs docs/tradeoff.md                                 # rebuild tables, plots and text from JSON

Protocol (ShrinkBench's advice, Blalock et al. 2020): for each model and seed a dense network is trained
once (cached under ``benchmarks/cache/`` with :func:`secateur.save`; that folder is never committed).
Then, for every method and compression level, a fresh copy of the trained weights is pruned one-shot,
fine-tuned with exactly the same budget (same optimizer steps, learning rate schedule and batches for
every method at a given seed) and evaluated on the test set.

* Unstructured, scope every conv and linear weight: magnitude (global threshold), magnitude (layer-wise,
  the same sparsity per layer), LAMP (Lee et al. 2021), SNIP (Lee et al. 2019), GraSP (Wang et al. 2020),
  SynFlow (Tanaka et al. 2020, iterative with an exponential schedule: the paper's 100 rounds in the full
  run, 20 in ``--quick``),
  element-wise first-order Taylor ``|w·g|`` (Molchanov et al. 2019), random (global), and
  ``torch.ao.pruning``'s WeightNormSparsifier with 1x1 blocks (layer-wise L2 magnitude; conv weights are
  viewed as ``(C_out, C_in·k·k)`` because the stock sparsifier only handles 2-D weights).
  Data-dependent scores (SNIP, GraSP, Taylor) use the same ``--score-batches`` training batches.
* Structured (channels physically removed through the dependency graph, ``ChannelPruner`` with
  ``target="macs"`` and uniform allocation, so each MAC target 1.5x-4x is hit by one common per-group
  fraction): l1, l2 (Li et al. 2017), random, fpgm (He et al. 2019), bn_scale (Liu et al. 2017; groups
  without a BN scale, e.g. VGG's hidden linear layer, stay unpruned),
  taylor (Molchanov et al. 2019), fisher (Theis et al. 2018), plus Torch-Pruning's MagnitudePruner
  (L1 filter norm, one per-layer ratio chosen on a grid to come closest to the same MAC target) when
  ``torch_pruning`` is importable. Without :mod:`secateur.pruners.channel`, l1/l2/random fall back to
  :func:`secateur.pruners.oneshot.prune_channels` with the same grid search on the channel ratio.

Every point is written to the JSON (``--out``) as soon as it is measured, so an interrupted run resumes
with ``--resume``. MACs are multiply-accumulates of one 28x28 image (``sparse_macs`` skip zero weights).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import secateur  # noqa: E402
from secateur.analysis.counting import count_macs, count_params  # noqa: E402
from secateur.data.fashion_mnist import load_fashion_mnist, normalize_fashion_mnist  # noqa: E402
from secateur.data.loader import StepLoader, TensorLoader  # noqa: E402
from secateur.methods.at_init import prune_at_init  # noqa: E402
from secateur.pruners.element import Pruner  # noqa: E402
from secateur.train import Trainer  # noqa: E402
from secateur.zoo import create_model  # noqa: E402

try:  # the schedule-driven structured pruner (optional: older checkouts only have prune_channels)
    from secateur.pruners.channel import ChannelPruner
except ImportError:  # pragma: no cover - depends on the checkout
    ChannelPruner = None

try:  # an optional extra, for the Torch-Pruning reference points
    import torch_pruning as tp
except ImportError:  # pragma: no cover - depends on the environment
    tp = None

UNSTRUCTURED = (
    "magnitude",
    "magnitude_layerwise",
    "lamp",
    "snip",
    "grasp",
    "synflow",
    "taylor",
    "random",
    "torch_ao_wns",
)
STRUCTURED = ("l1", "l2", "fpgm", "bn_scale", "taylor", "fisher", "random", "tp_magnitude")
LABELS = {
    "magnitude": "magnitude (global)",
    "magnitude_layerwise": "magnitude (layer-wise)",
    "lamp": "LAMP",
    "snip": "SNIP",
    "grasp": "GraSP",
    "synflow": "SynFlow",
    "taylor": "Taylor",
    "random": "random",
    "torch_ao_wns": "torch.ao WeightNormSparsifier",
    "l1": "L1 filter norm",
    "l2": "L2 filter norm",
    "fpgm": "FPGM",
    "bn_scale": "BN scale",
    "fisher": "Fisher",
    "tp_magnitude": "Torch-Pruning MagnitudePruner (L1)",
}

QUICK = {
    "models": ["resnet8:width=0.5,stem_stride=2", "vgg_small:width=0.125"],
    "seeds": [0],
    "sparsities": [0.8, 0.95],
    "mac_targets": [2.0, 4.0],
    "train_subset": 10000,
    "test_subset": 2000,
    "dense_epochs": 1,
    "ft_steps": 12,
    "score_batches": 2,
    "synflow_rounds": 20,
}
FULL = {
    "models": ["resnet20:stem_stride=2", "vgg_small"],
    "seeds": [0, 1, 2],
    "sparsities": [0.5, 0.7, 0.8, 0.9, 0.95, 0.98],
    "mac_targets": [1.5, 2.0, 3.0, 4.0],
    "train_subset": None,
    "test_subset": None,
    "dense_epochs": 10,
    "ft_steps": 469,  # one epoch of the 60k training set at batch 128
    "score_batches": 4,
    "synflow_rounds": 100,
}


# --------------------------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_model(spec: str) -> tuple[str, dict[str, Any]]:
    """``"resnet8:width=0.5,stem_stride=2"`` -> ``("resnet8", {"width": 0.5, "stem_stride": 2})``."""
    name, _, rest = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        num = float(value)
        kwargs[key] = int(num) if num.is_integer() and "." not in value else num
    return name, kwargs


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    model.train(was)
    return correct / len(x)


def git_state() -> dict[str, Any]:
    def run(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    tracked = run("ls-files", "src/secateur/structured_pruner.py", "src/secateur/criteria/group.py").split()
    return {
        "commit": run("rev-parse", "HEAD").strip(),
        "dirty_src": bool(run("status", "--porcelain", "src").strip()),
        "structured_pruner_tracked": "src/secateur/structured_pruner.py" in tracked,
    }


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# ------------------------------------------------------------------------------------------ benchmark
class Bench:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        xtr, ytr = load_fashion_mnist("train")
        xte, yte = load_fashion_mnist("test")
        if cfg["train_subset"]:
            xtr, ytr = xtr[: cfg["train_subset"]], ytr[: cfg["train_subset"]]
        if cfg["test_subset"]:
            xte, yte = xte[: cfg["test_subset"]], yte[: cfg["test_subset"]]
        self.xtr, self.ytr = normalize_fashion_mnist(xtr), ytr
        self.xte, self.yte = normalize_fashion_mnist(xte), yte
        self.example = self.xtr[:1].clone()
        self.cache = Path(cfg["cache_dir"])

    def loader(self, seed: int) -> TensorLoader:
        return TensorLoader(self.xtr, self.ytr, self.cfg["batch_size"], shuffle=True, seed=seed)

    def score_data(self, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ld = TensorLoader(self.xtr, self.ytr, self.cfg["batch_size"], shuffle=True, seed=10_000 + seed)
        out = []
        for batch in ld:
            out.append(batch)
            if len(out) == self.cfg["score_batches"]:
                break
        return out

    # -- dense ------------------------------------------------------------------------------------
    def dense(self, spec: str, seed: int) -> tuple[nn.Module, dict[str, Any]]:
        name, kwargs = parse_model(spec)
        key = json.dumps(
            [
                spec,
                seed,
                self.cfg["train_subset"],
                self.cfg["dense_epochs"],
                self.cfg["dense_lr"],
                self.cfg["batch_size"],
            ],
            sort_keys=True,
        )
        tag = f"{spec.replace(':', '_').replace(',', '_').replace('=', '')}_s{seed}_"
        folder = self.cache / (tag + hashlib.sha1(key.encode()).hexdigest()[:10])
        info_file = folder / "bench.json"
        if info_file.exists():
            model = secateur.load(folder)
            info = json.loads(info_file.read_text())
            log(f"dense {spec} seed {seed}: cached ({folder.name}), accuracy {info['accuracy']:.4f}")
            return model, info
        torch.manual_seed(seed)
        model = create_model(name, **kwargs)
        t0 = time.perf_counter()
        trainer = Trainer(
            model,
            self.loader(seed),
            epochs=self.cfg["dense_epochs"],
            lr=self.cfg["dense_lr"],
            weight_decay=5e-4,
            progress=False,
            log_every=0,
        )
        trainer.fit()
        wall = time.perf_counter() - t0
        acc = evaluate(model, self.xte, self.yte)
        info = {
            "model": spec,
            "seed": seed,
            "accuracy": acc,
            "train_s": wall,
            "steps": trainer.global_step,
            "s_per_step": wall / max(trainer.global_step, 1),
            **count_params(model),
            "macs": count_macs(model, self.example)["macs"],
        }
        secateur.save(model, folder, metadata={"benchmark": "tradeoff", "key": key})
        info_file.write_text(json.dumps(info, indent=1))
        log(f"dense {spec} seed {seed}: accuracy {acc:.4f} in {wall:.0f}s ({trainer.global_step} steps)")
        return model, info

    def finetune(self, model: nn.Module, seed: int) -> float:
        t0 = time.perf_counter()
        loader = StepLoader(self.loader(1000 + seed), self.cfg["ft_steps"])
        Trainer(
            model, loader, epochs=1, lr=self.cfg["ft_lr"], weight_decay=5e-4, progress=False, log_every=0
        ).fit()
        return time.perf_counter() - t0

    # -- unstructured -------------------------------------------------------------------------------
    def prune_unstructured(self, model: nn.Module, method: str, sparsity: float, seed: int) -> Callable:
        """Mask ``model`` in place; returns the function that bakes the masks after fine-tuning."""
        data = self.score_data(seed)
        if method == "torch_ao_wns":
            return torch_ao_prune(model, sparsity)
        if method == "synflow":
            rounds = self.cfg["synflow_rounds"]
            pruner = prune_at_init(model, "synflow", sparsity, example_inputs=self.example, rounds=rounds)
            return pruner.finalize
        crit, alloc, kw = method, "global", {}
        if method == "magnitude_layerwise":
            crit, alloc = "magnitude", "layerwise"
        elif method in ("snip", "grasp", "taylor"):
            kw = {"num_batches": None}
        elif method == "random":
            kw = {"seed": seed}
        pruner = Pruner(model, sparsity, criterion=crit, allocation=alloc, data=data, criterion_kwargs=kw)
        pruner.prune_to(sparsity)
        return pruner.finalize

    # -- structured ---------------------------------------------------------------------------------
    def prune_structured(self, model: nn.Module, method: str, reduction: float, seed: int) -> nn.Module:
        target = 1.0 - 1.0 / reduction
        if method == "tp_magnitude":
            return tp_prune(model, self.example, reduction)
        if ChannelPruner is None:
            return fallback_channels(model, self.example, method, reduction, seed)
        # bn_scale: groups without a norm scale (VGG's hidden linear) are left unpruned, not an error
        kw = {"seed": seed} if method == "random" else {"missing": "skip"} if method == "bn_scale" else {}
        data = self.score_data(seed) if method in ("taylor", "fisher") else None
        cp = ChannelPruner(
            model,
            self.example,
            schedule=target,
            criterion=method,
            allocation="uniform",
            target="macs",
            data=data,
            criterion_kwargs=kw,
        )
        cp.prune_to(target)
        return cp.finalize()

    # -- one point ------------------------------------------------------------------------------------
    def point(self, dense: nn.Module, dinfo: dict, kind: str, method: str, level: float, seed: int) -> dict:
        model = copy.deepcopy(dense)
        model.train()
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        bake = None
        if kind == "unstructured":
            bake = self.prune_unstructured(model, method, level, seed)
        else:
            model = self.prune_structured(model, method, level, seed)
        prune_s = time.perf_counter() - t0
        acc_oneshot = evaluate(model, self.xte, self.yte) if self.cfg["eval_oneshot"] else None
        ft_s = self.finetune(model, seed)
        if bake is not None:
            bake()
        acc = evaluate(model, self.xte, self.yte)
        params = count_params(model)
        macs = count_macs(model, self.example)
        conv_lin = [model.get_submodule(n).weight for n in linear_names(model)]
        total = sum(w.numel() for w in conv_lin)
        zeros = sum(int((w == 0).sum()) for w in conv_lin)
        return {
            "model": dinfo["model"],
            "seed": seed,
            "kind": kind,
            "method": method,
            "target_sparsity": level if kind == "unstructured" else None,
            "target_mac_reduction": level if kind == "structured" else None,
            "sparsity": zeros / total,
            "params": params["params"],
            "nonzero_params": params["nonzero_params"],
            "param_reduction": dinfo["params"] / max(params["nonzero_params"], 1),
            "macs": macs["macs"],
            "sparse_macs": macs["sparse_macs"],
            "mac_reduction": dinfo["macs"] / max(macs["macs"], 1),
            "sparse_mac_reduction": dinfo["macs"] / max(macs["sparse_macs"], 1),
            "accuracy_oneshot": acc_oneshot,
            "accuracy": acc,
            "dense_accuracy": dinfo["accuracy"],
            "finetune": {
                "steps": self.cfg["ft_steps"],
                "batch_size": self.cfg["batch_size"],
                "lr": self.cfg["ft_lr"],
                "schedule": "cosine",
                "optimizer": "sgd(0.9), wd 5e-4",
            },
            "prune_s": prune_s,
            "finetune_s": ft_s,
            "wall_s": time.perf_counter() - t0,
        }


class _ConvWeightNormSparsifier:
    """``torch.ao.pruning.WeightNormSparsifier`` with 4-D conv weights viewed as 2-D ``(C_out, -1)``.

    The stock sparsifier reads the last two dims as its 2-D grid and fails on conv weights; this wrapper
    only reshapes (built lazily so that importing this script does not import torch.ao.pruning).
    """

    @staticmethod
    def build(sparsity: float) -> Any:
        from secateur.app.compare import conv_row_weight_norm_sparsifier

        return conv_row_weight_norm_sparsifier(sparsity)


def torch_ao_prune(model: nn.Module, sparsity: float) -> Callable:
    sp = _ConvWeightNormSparsifier.build(sparsity)
    sp.prepare(model, [{"tensor_fqn": f"{n}.weight"} for n in linear_names(model)])
    sp.step()
    return sp.squash_mask


def _ratio_for(macs_at: Callable[[float], float], goal: float, hi: float = 0.8, step: float = 0.02) -> float:
    """The channel ratio on a grid over (0, hi] whose remaining MACs are closest to ``goal`` (log scale).

    A scan, not a bisection: Torch-Pruning skips a layer that a ratio would empty and rounds channel
    counts, so on small nets MACs move in jumps and are not monotone in the ratio.
    """
    best, best_err = 0.0, math.inf
    for k in range(1, int(round(hi / step)) + 1):
        macs = macs_at(k * step)
        err = abs(math.log(max(macs, 1.0) / goal))
        if err < best_err:
            best, best_err = k * step, err
        if macs < goal / 1.5:
            break
    return best


def tp_prune(model: nn.Module, example: torch.Tensor, reduction: float) -> nn.Module:
    if tp is None:
        raise RuntimeError("torch_pruning is not installed")
    goal = count_macs(model, example)["macs"] / reduction

    def apply(m: nn.Module, ratio: float) -> nn.Module:
        fc = [mm for mm in m.modules() if isinstance(mm, nn.Linear)][-1:]
        pr = tp.pruner.MagnitudePruner(
            m,
            example,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=ratio,
            ignored_layers=fc,
        )
        pr.step()
        return m

    def macs_at(ratio: float) -> float:
        return count_macs(apply(copy.deepcopy(model), ratio), example)["macs"]

    return apply(model, _ratio_for(macs_at, goal))


def fallback_channels(
    model: nn.Module, example: torch.Tensor, method: str, reduction: float, seed: int
) -> nn.Module:  # pragma: no cover - only without structured_pruner
    from secateur.pruners.oneshot import prune_channels

    if method not in ("l1", "l2", "random"):
        raise RuntimeError(f"{method} needs secateur.pruners.channel")
    goal = count_macs(model, example)["macs"] / reduction
    torch.manual_seed(seed)

    def macs_at(ratio: float) -> float:
        m, _ = prune_channels(copy.deepcopy(model), example, sparsity=ratio, criterion=method)
        return count_macs(m, example)["macs"]

    torch.manual_seed(seed)
    m, _ = prune_channels(model, example, sparsity=_ratio_for(macs_at, goal), criterion=method)
    return m


# ------------------------------------------------------------------------------- GraSP diagnostic
class _Transformed:
    """A criterion whose scores are ``fn(inner scores)`` (e.g. negated: prune the other end)."""

    def __init__(self, inner: Any, fn: Callable[[torch.Tensor], torch.Tensor], name: str) -> None:
        self.inner, self.fn, self.name = inner, fn, name

    def scores(self, targets: Any) -> dict[str, torch.Tensor]:
        return {k: self.fn(v) for k, v in self.inner.scores(targets).items()}


def _loss_and_grad_norm2(model: nn.Module, data: list) -> tuple[float, float]:
    """Mean cross-entropy over ``data`` and ||∇L||² w.r.t. the kept conv/linear weights (the gradient
    flow GraSP's score predicts, to first order, for the pruned network)."""
    from secateur.masks.element import original

    was = model.training
    model.eval()
    # the stored tensors (under a mask: the parametrization's original, whose gradient is masked)
    weights = [original(model.get_submodule(n), "weight") for n in linear_names(model)]
    loss = sum(nn.functional.cross_entropy(model(x), y) for x, y in data) / len(data)
    g = torch.autograd.grad(loss, weights, allow_unused=True)
    model.train(was)
    return float(loss.detach()), float(sum((t * t).sum() for t in g if t is not None))


def grasp_check(cfg: dict[str, Any], out: Path, sparsities: tuple[float, ...] = (0.5, 0.9)) -> dict:
    """Why GraSP fails on *trained* weights: one-shot pruning of each model's seed-0 dense weights by
    magnitude, random, GraSP (the paper's direction: remove the highest ``S = -θ⊙Hg``), GraSP inverted
    (remove the lowest S), GraSP with the released code's temperature 200, and |θ⊙Hg|; for each, test
    accuracy, loss and gradient norm ||∇L||² on the scoring batches after pruning (eval-mode BN), and the
    share of the pruned weights that lie in the upper half by |w|. No fine-tuning."""
    from secateur.criteria.element.at_init import GraSP

    torch.set_num_threads(cfg["threads"])
    bench = Bench(cfg)
    res: dict[str, Any] = {"config": {**cfg, "sparsities": list(sparsities)}, "rows": []}
    for spec in cfg["models"]:
        dense, dinfo = bench.dense(spec, 0)
        data = bench.score_data(0)
        base = {
            "accuracy": dinfo["accuracy"],
            **dict(zip(("loss", "grad_norm2"), _loss_and_grad_norm2(dense, data))),
        }
        res["rows"].append({"model": spec, "variant": "dense", "sparsity": 0.0, **base})
        for sp in sparsities:
            for variant in ("magnitude", "random", "grasp", "grasp_inverted", "grasp_T200", "grasp_abs"):
                model = copy.deepcopy(dense)
                model.train()
                weights = {
                    f"{n}.weight": model.get_submodule(n).weight.detach().abs().clone()
                    for n in linear_names(model)
                }
                allw = torch.cat([w.flatten() for w in weights.values()])
                median = allw.median()
                if variant in ("magnitude", "random"):
                    kw = {"seed": 0} if variant == "random" else {}
                    pr = Pruner(model, sp, criterion=variant, allocation="global", criterion_kwargs=kw)
                else:
                    temp = 200.0 if variant == "grasp_T200" else 1.0
                    inner = GraSP(model, data, num_batches=None, temperature=temp)
                    fn = {"grasp_inverted": torch.neg, "grasp_abs": torch.abs}.get(variant, lambda v: v)
                    pr = Pruner(model, sp, criterion=_Transformed(inner, fn, variant), allocation="global")
                pr.prune_to(sp)
                masks = pr.masks()
                pruned_big = sum(int((~masks[n] & (weights[n] > median)).sum()) for n in masks)
                pruned = sum(int((~m).sum()) for m in masks.values())
                loss, gn2 = _loss_and_grad_norm2(model, data)
                row = {
                    "model": spec,
                    "variant": variant,
                    "sparsity": sp,
                    "accuracy": evaluate(model, bench.xte, bench.yte),
                    "loss": loss,
                    "grad_norm2": gn2,
                    "pruned_in_upper_half_by_abs_w": pruned_big / max(pruned, 1),
                }
                res["rows"].append(row)
                log(
                    f"grasp check {spec} {variant:15s} {sp}: "
                    + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float))
                )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    return res


def grasp_table(res: dict) -> list[str]:
    """Markdown table of :func:`grasp_check`'s rows."""
    names = {
        "dense": "dense (no pruning)",
        "magnitude": "magnitude (global)",
        "random": "random",
        "grasp": "GraSP, paper's direction (remove highest −θ⊙Hg)",
        "grasp_inverted": "GraSP inverted (remove lowest −θ⊙Hg)",
        "grasp_T200": "GraSP, temperature 200 (released code)",
        "grasp_abs": "\\|θ⊙Hg\\| (remove smallest)",
    }
    lines = [
        "| model | sparsity | variant | one-shot accuracy | loss | ‖∇L‖² "
        "| pruned weights in the upper half by \\|w\\| |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in res["rows"]:
        share = r.get("pruned_in_upper_half_by_abs_w")
        lines.append(
            f"| {r['model'].partition(':')[0]} | {100 * r['sparsity']:g}% "
            f"| {names.get(r['variant'], r['variant'])} | "
            f"{100 * r['accuracy']:.1f} | {r['loss']:.3f} | {r['grad_norm2']:.3g} | "
            f"{'—' if share is None else f'{100 * share:.0f}%'} |"
        )
    return lines


# ------------------------------------------------------------------------------------------- run
def run(cfg: dict[str, Any], out: Path, resume: bool) -> dict[str, Any]:
    torch.set_num_threads(cfg["threads"])
    results: dict[str, Any] = {"config": cfg, "dense": [], "points": [], "errors": []}
    prev_wall, commands = 0.0, []
    if resume and out.exists():
        old = json.loads(out.read_text())
        results["points"], results["errors"] = old.get("points", []), []
        prev_wall = old.get("total_wall_s", 0.0)
        commands = old.get("commands", [old.get("command")])
        results["dense"] = old.get("dense", [])
    results.update(
        {
            "command": cfg["command"],
            "commands": [c for c in commands if c] + [cfg["command"]],
            "environment": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "torch_pruning": getattr(tp, "__version__", None),
                "threads": cfg["threads"],
                "platform": platform.platform(),
                "processor": platform.processor(),
                "structured_pruner": ChannelPruner is not None,
                **git_state(),
            },
        }
    )
    done = {
        (p["model"], p["seed"], p["kind"], p["method"], p["target_sparsity"] or p["target_mac_reduction"])
        for p in results["points"]
    }
    bench = Bench(cfg)
    t_start = time.perf_counter()

    def save() -> None:
        results["total_wall_s"] = prev_wall + time.perf_counter() - t_start
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))

    # model-major: a run cut short still has every seed of the first model(s), not one seed of each
    for spec in cfg["models"]:
        for seed in cfg["seeds"]:
            dense, dinfo = bench.dense(spec, seed)
            results["dense"] = [d for d in results["dense"] if (d["model"], d["seed"]) != (spec, seed)]
            results["dense"].append(dinfo)
            save()
            jobs = [("unstructured", m, s) for s in cfg["sparsities"] for m in cfg["unstructured"]]
            jobs += [("structured", m, r) for r in cfg["mac_targets"] for m in cfg["structured"]]
            for kind, method, level in jobs:
                if (spec, seed, kind, method, level) in done:
                    continue
                if method == "tp_magnitude" and tp is None:
                    continue
                try:
                    p = bench.point(dense, dinfo, kind, method, level, seed)
                except Exception as exc:  # record and go on: one failing method must not sink the run
                    err = {
                        "model": spec,
                        "seed": seed,
                        "kind": kind,
                        "method": method,
                        "level": level,
                        "error": f"{type(exc).__name__}: {exc}",
                    }
                    results["errors"].append(err)
                    log(f"ERROR {err}")
                    save()
                    continue
                results["points"].append(p)
                save()
                extra = (
                    f"sparsity {p['sparsity']:.3f}"
                    if kind == "unstructured"
                    else f"MACs /{p['mac_reduction']:.2f}"
                )
                one = "" if p["accuracy_oneshot"] is None else f"one-shot {p['accuracy_oneshot']:.4f} -> "
                log(
                    f"{spec} s{seed} {kind:12s} {method:20s} {level:<5g} {extra}: {one}"
                    f"{p['accuracy']:.4f} ({p['wall_s']:.0f}s)"
                )
    save()
    return results


# ------------------------------------------------------------------------------------------- docs
def _stats(vals: list[float]) -> tuple[float, float]:
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd


def _cell(vals: list[float], n_seeds: int) -> str:
    if not vals:
        return "—"
    m, sd = _stats([100 * v for v in vals])
    return f"{m:.1f} ± {sd:.1f}" if n_seeds > 1 and len(vals) > 1 else f"{m:.1f}"


def _group(points: list[dict], key: str = "accuracy") -> dict[tuple, list[float]]:
    out: dict[tuple, list[float]] = {}
    for p in points:
        level = p["target_sparsity"] if p["kind"] == "unstructured" else p["target_mac_reduction"]
        if p.get(key) is not None:
            out.setdefault((p["model"], p["kind"], p["method"], level), []).append(p[key])
    return out


def _plots(res: dict, img_dir: Path, prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    g = _group(res["points"])
    cfg = res["config"]
    files = []
    styles = {
        m: (c, mk)
        for m, c, mk in zip(
            list(UNSTRUCTURED) + [s for s in STRUCTURED if s not in UNSTRUCTURED],
            [f"C{i}" for i in range(20)],
            "os^vD<>phx*dP+1234",
        )
    }
    for kind, levels_key, xlabel in (
        ("unstructured", "sparsities", "sparsity (logit-like axis: -log10(density))"),
        ("structured", "mac_targets", "achieved MAC reduction (x, log axis)"),
    ):
        models = cfg["models"]
        fig, axes = plt.subplots(1, len(models), figsize=(6.2 * len(models), 4.4), squeeze=False)
        for ax, spec in zip(axes[0], models):
            dense = [d["accuracy"] for d in res["dense"] if d["model"] == spec]
            for method in cfg["unstructured" if kind == "unstructured" else "structured"]:
                xs, ys, es = [], [], []
                for lv in cfg[levels_key]:
                    vals = g.get((spec, kind, method, lv))
                    if vals:
                        m, sd = _stats([100 * v for v in vals])
                        if kind == "unstructured":
                            xs.append(-math.log10(1 - lv))
                        else:  # the achieved reduction (mean over seeds), not the target
                            red = [
                                p["mac_reduction"]
                                for p in res["points"]
                                if p["model"] == spec
                                and p["kind"] == kind
                                and p["method"] == method
                                and p["target_mac_reduction"] == lv
                            ]
                            xs.append(sum(red) / len(red))
                        ys.append(m)
                        es.append(sd)
                if xs:
                    c, mk = styles.get(method, ("k", "o"))
                    ax.errorbar(
                        xs,
                        ys,
                        yerr=es if len(cfg["seeds"]) > 1 else None,
                        color=c,
                        marker=mk,
                        capsize=2,
                        label=LABELS.get(method, method),
                        lw=1.2,
                        ms=4,
                    )
            if dense:
                ax.axhline(100 * _stats(dense)[0], color="k", ls=":", lw=1, label="dense")
            if kind == "unstructured":
                ticks = cfg[levels_key]
                ax.set_xticks([-math.log10(1 - s) for s in ticks])
                ax.set_xticklabels([f"{100 * s:g}%" for s in ticks])
            else:
                ax.set_xscale("log", base=2)
                ax.set_xticks(cfg[levels_key])
                ax.set_xticklabels([f"{r:g}x" for r in cfg[levels_key]])
                ax.minorticks_off()
            ax.set_title(spec)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy after fine-tuning (%)")
            ax.grid(alpha=0.3)
        next((a for a in axes[0] if a.get_legend_handles_labels()[0]), axes[0][-1]).legend(
            fontsize=7, loc="lower left"
        )
        fig.tight_layout()
        name = f"tradeoff_{prefix}_{kind}.png"
        fig.savefig(img_dir / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def _ranking_notes(res: dict) -> list[str]:
    """Sentences comparing this run's ranking with the papers' claims, with a noise threshold."""
    cfg = res["config"]
    g = _group(res["points"])
    n_test = res.get("n_test", 10000)
    n_seeds = len(cfg["seeds"])
    notes = []

    def mean(spec: str, kind: str, method: str, lv: float) -> float | None:
        v = g.get((spec, kind, method, lv))
        return None if not v else 100 * sum(v) / len(v)

    def tie_pp(acc: float) -> float:
        # 2 standard errors of a difference of two binomial accuracies on n_test images, per seed mean
        p = min(max(acc / 100, 0.01), 0.99)
        return 2 * 100 * math.sqrt(2 * p * (1 - p) / n_test / n_seeds)

    by_seed: dict[tuple, dict[int, float]] = {}
    for p in res["points"]:
        level = p["target_sparsity"] if p["kind"] == "unstructured" else p["target_mac_reduction"]
        by_seed.setdefault((p["model"], p["kind"], p["method"], level), {})[p["seed"]] = 100 * p["accuracy"]

    def compare(a: str, b: str, kind: str, levels: list[float], unit: str) -> list[str]:
        parts = []
        for spec in cfg["models"]:
            for lv in levels:
                ma, mb = mean(spec, kind, a, lv), mean(spec, kind, b, lv)
                if ma is None or mb is None:
                    continue
                d = ma - mb
                t = tie_pp((ma + mb) / 2)
                # paired over seeds (each seed starts both methods from the same dense weights)
                sa, sb = by_seed.get((spec, kind, a, lv), {}), by_seed.get((spec, kind, b, lv), {})
                diffs = [sa[k] - sb[k] for k in sa if k in sb]
                agree = sum(1 for x in diffs if (x > 0) == (d > 0) and x != 0)
                clear = abs(d) >= t and (len(diffs) < 2 or agree == len(diffs))
                verdict = "tie" if not clear else (f"{LABELS[a]} ahead" if d > 0 else f"{LABELS[b]} ahead")
                seeds = f", same sign on {agree}/{len(diffs)} seeds" if len(diffs) > 1 else ""
                if diffs and all(x == 0 for x in diffs):
                    seeds = ", identical on every seed"
                parts.append(
                    f"{spec.partition(':')[0]} @ {lv:g}{unit}: {ma:.1f} vs {mb:.1f} "
                    f"({verdict}, noise ±{t:.1f}{seeds})"
                )
        return parts

    us, st = cfg["sparsities"], cfg["mac_targets"]
    for title, a, b, kind, lv, unit in (
        (
            "Global vs layer-wise magnitude (Blalock et al. 2020 and Lee et al. 2021 find global "
            "thresholds better at high sparsity)",
            "magnitude",
            "magnitude_layerwise",
            "unstructured",
            us,
            "",
        ),
        (
            "LAMP vs global magnitude (Lee et al. 2021 claim LAMP's gain grows at extreme sparsity)",
            "lamp",
            "magnitude",
            "unstructured",
            us,
            "",
        ),
        (
            "SNIP vs magnitude (SNIP's paper prunes at init; from trained weights with fine-tuning, Blalock "
            "et al. and Frankle et al. 2021 find magnitude hard to beat)",
            "snip",
            "magnitude",
            "unstructured",
            us,
            "",
        ),
        (
            "GraSP vs magnitude (GraSP claims gains over SNIP at init at high sparsity; after training "
            "Frankle et al. 2021 find it no better than magnitude)",
            "grasp",
            "magnitude",
            "unstructured",
            us,
            "",
        ),
        (
            "SynFlow vs magnitude (SynFlow's claim is avoiding layer collapse at init at extreme sparsity)",
            "synflow",
            "magnitude",
            "unstructured",
            us,
            "",
        ),
        (
            "Taylor vs magnitude (element-wise first-order Taylor ≈ SNIP's score on trained weights)",
            "taylor",
            "magnitude",
            "unstructured",
            us,
            "",
        ),
        (
            "Magnitude vs random (every paper: random is the floor; the gap should widen with sparsity)",
            "magnitude",
            "random",
            "unstructured",
            us,
            "",
        ),
        (
            "torch.ao WeightNormSparsifier vs secateur layer-wise magnitude (the same rule: should tie)",
            "torch_ao_wns",
            "magnitude_layerwise",
            "unstructured",
            us,
            "",
        ),
        (
            "L1 filter norm vs random channels (Liu et al. 2019 and Li et al. 2022 find random channel "
            "pruning close to norm criteria once fine-tuned)",
            "l1",
            "random",
            "structured",
            st,
            "x",
        ),
        (
            "FPGM vs L1 (He et al. 2019 claim FPGM beats norm-based filter pruning)",
            "fpgm",
            "l1",
            "structured",
            st,
            "x",
        ),
        (
            "Taylor vs L1 channels (Molchanov et al. 2019 claim Taylor beats weight norms)",
            "taylor",
            "l1",
            "structured",
            st,
            "x",
        ),
        ("Fisher vs L1 channels (Theis et al. 2018)", "fisher", "l1", "structured", st, "x"),
        (
            "BN scale vs L1 (Liu et al. 2017 rank by BN γ after sparsity training; here without it)",
            "bn_scale",
            "l1",
            "structured",
            st,
            "x",
        ),
        (
            "Torch-Pruning MagnitudePruner vs secateur L1 (same criterion family: should tie)",
            "tp_magnitude",
            "l1",
            "structured",
            st,
            "x",
        ),
    ):
        parts = compare(a, b, kind, lv, unit)
        if parts:
            notes.append(f"- **{title}.** " + "; ".join(parts) + ".")
    return notes


LITERATURE = """\
What the papers claim, and how this protocol tests it:

- **SNIP** (Lee et al., ICLR 2019), **GraSP** (Wang et al., ICLR 2020) and **SynFlow** (Tanaka et al., NeurIPS
  2020) are pruning-*at-initialisation* criteria: their claims concern scoring untrained weights. Here they
  score *trained* weights and the network is fine-tuned, the setting in which Blalock et al. (MLSys 2020,
  "What is the state of neural network pruning?") and Frankle et al. (ICLR 2021, "Pruning neural networks
  at initialization: why are we missing the mark?") find plain magnitude pruning hard to beat. Agreement
  with them means: no at-init criterion clearly above global magnitude.
- **Taylor** (element-wise ``|w·g|``, Molchanov et al. 2017/2019) is SNIP's score computed on trained
  weights; near convergence gradients are small and noisy, so it is expected to trail magnitude.
- **LAMP** (Lee et al., ICLR 2021) claims an advantage over global magnitude that grows with sparsity,
  mostly visible at 95-99%; at moderate sparsity all magnitude variants should tie.
- **Global vs layer-wise magnitude**: a global threshold adapts per-layer sparsity and is usually better at
  high sparsity; a uniform per-layer rate also prunes the tiny first conv and classifier as hard as the
  rest (Gale et al. 2019 keep the first layer dense for this reason; here every layer is in scope).
- **Random** is the floor every paper reports; its gap to magnitude should widen with sparsity.
- **Channels**: Li et al. (ICLR 2017, L1 filter norm) vs FPGM (He et al., CVPR 2019, claims gains over norm
  criteria), Taylor (Molchanov et al., CVPR 2019, claims gains over weight norms), Fisher (Theis et al. 2018),
  BN scale (Liu et al., ICCV 2017, which assumes an L1 penalty on the BN scales during training; none here).
  Liu et al. (ICLR 2019, "Rethinking the value of network pruning") and Li et al. (CVPR 2022, "Revisiting
  random channel pruning") find that, once fine-tuned, random channel selection comes close to the
  criteria; agreement with them means small gaps between all channel criteria and random.
- **Reference implementations**: torch.ao's WeightNormSparsifier with 1x1 blocks is layer-wise magnitude,
  and Torch-Pruning's MagnitudePruner is the L1 filter norm with one per-layer ratio; each should tie with
  its secateur counterpart (differences come from tie-breaking, per-tensor rounding and how the MAC target
  is met).
"""


def estimate_full(threads: int, steps: int = 4) -> dict[str, Any]:
    """Time a few training steps of the full configuration's models and extrapolate the full run."""
    torch.set_num_threads(threads)
    cfg = FULL
    n_points = len(UNSTRUCTURED) * len(cfg["sparsities"]) + len(STRUCTURED) * len(cfg["mac_targets"])
    per_model = {}
    for spec in cfg["models"]:
        name, kwargs = parse_model(spec)
        model = create_model(name, **kwargs)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
        times = []
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        per_model[spec] = sorted(times[1:])[len(times[1:]) // 2]
    dense_steps = cfg["dense_epochs"] * math.ceil(60000 / 128)
    total_steps = dense_steps + n_points * cfg["ft_steps"]
    hours = sum(s * total_steps * len(cfg["seeds"]) for s in per_model.values()) * 1.25 / 3600
    return {
        "s_per_train_step": per_model,
        "points_per_model_seed": n_points,
        "train_steps_per_model_seed": total_steps,
        "hours_estimate": hours,
        "note": "median step time x steps x seeds, +25% for scoring "
        "and evaluation; measured on this machine while the quick run finished",
    }


def page(res: dict, img_dir: Path, prefix: str, label: str, literature: bool = True) -> list[str]:
    """The Markdown of one results file (tables, plots, comparisons; literature notes if asked)."""
    cfg = res["config"]
    files = _plots(res, img_dir, prefix)
    g = _group(res["points"])
    g1 = _group(res["points"], "accuracy_oneshot")
    ns = len(cfg["seeds"])
    rel = Path("img")
    produced = ", then ".join(f"`{c}`" for c in res.get("commands", [res["command"]]))
    test_desc = f"the first {cfg['test_subset']}" if cfg["test_subset"] else "the full 10k"
    lines = [
        f"# Accuracy versus compression ({label})",
        "",
        f"Produced by {produced} (results: `{cfg['out_display']}`). Wall time "
        f"{res.get('total_wall_s', 0) / 60:.1f} min on {res['environment']['threads']} CPU threads "
        f"({res['environment']['platform']}), torch {res['environment']['torch']}, Torch-Pruning "
        f"{res['environment']['torch_pruning']}, git {res['environment']['commit'][:10]}"
        f"{' + uncommitted changes under src/' if res['environment']['dirty_src'] else ''}.",
        "",
        *([f"Note: {res['note']}.", ""] if res.get("note") else []),
        "Protocol: dense training once per model and seed, then for every method and compression level a "
        "fresh copy of the trained weights is pruned **one-shot** and fine-tuned with the **same budget** "
        f"({cfg['ft_steps']} SGD steps of batch {cfg['batch_size']}, momentum 0.9, weight decay 5e-4, cosine "
        f"from lr {cfg['ft_lr']}, the same batches for every method at a seed), then evaluated on "
        f"{test_desc} "
        f"Fashion-MNIST test images. Dense training: {cfg['dense_epochs']} epoch(s) of "
        f"{cfg['train_subset'] or 60000} training images, SGD lr {cfg['dense_lr']} cosine. "
        f"Data-dependent scores use {cfg['score_batches']} training batches; SynFlow runs "
        f"{cfg['synflow_rounds']} rounds. Seeds: {cfg['seeds']} "
        f"({'mean ± std over seeds' if ns > 1 else 'one seed: no error bars'}). Accuracies in %.",
        "",
        "Unstructured scope: every conv and linear weight (first conv and classifier included); "
        "sparsity is the fraction of those weights that are zero. Structured: whole channels removed "
        "physically through the dependency graph; the MAC target is reached by one common per-group "
        "fraction (uniform allocation) for secateur's criteria, and by one per-layer ratio found by "
        "a grid search for Torch-Pruning (closest to the target). Small nets have few channels per layer, "
        "so the achieved MAC reduction (in square brackets, and the x position in the plot) can miss the "
        "target; compare methods at achieved reductions.",
        "",
        "## Dense baselines",
        "",
        "| model | accuracy | params | MACs | dense training |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for spec in cfg["models"]:
        ds = [d for d in res["dense"] if d["model"] == spec]
        if ds:
            lines.append(
                f"| {spec} | {_cell([d['accuracy'] for d in ds], ns)} | {ds[0]['params']:,} | "
                f"{ds[0]['macs']:,} | {sum(d['train_s'] for d in ds) / len(ds):.0f} s |"
            )
    for kind, lv_key, unit in (("unstructured", "sparsities", "%"), ("structured", "mac_targets", "x")):
        levels = cfg[lv_key]
        head = [f"{100 * s:g}%" if unit == "%" else f"{s:g}x MACs" for s in levels]
        lines += [
            "",
            f"## {kind.capitalize()}",
            "",
            f"![{kind}]({rel / files[0 if kind == 'unstructured' else 1]})",
            "",
        ]
        for spec in cfg["models"]:
            lines += [
                f"**{spec}** — accuracy after fine-tuning, mean ± std over seeds (one-shot accuracy "
                "before fine-tuning in brackets, over the seeds where it was measured)"
                + (", achieved MAC reduction in square brackets" if kind == "structured" else ""),
                "",
                "| method | " + " | ".join(head) + " |",
                "| --- |" + " ---: |" * len(levels),
            ]
            for method in cfg[kind]:
                cells = []
                for lv in levels:
                    vals = g.get((spec, kind, method, lv), [])
                    one = g1.get((spec, kind, method, lv), [])
                    c = _cell(vals, ns)
                    if one:
                        c += f" ({_cell(one, ns)})"
                    if kind == "structured" and vals:
                        red = [
                            p["mac_reduction"]
                            for p in res["points"]
                            if p["model"] == spec
                            and p["kind"] == kind
                            and p["method"] == method
                            and p["target_mac_reduction"] == lv
                        ]
                        c += f" [{sum(red) / len(red):.2f}x]"
                    cells.append(c)
                if any(c != "—" for c in cells):
                    lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
            lines.append("")
    if res.get("errors"):
        lines += (
            ["## Failed points", ""]
            + [
                f"- {e['model']} seed {e['seed']} {e['kind']} {e['method']} @ {e['level']}: `{e['error']}`"
                for e in res["errors"]
            ]
            + [""]
        )
    lines += [
        "## Where the ranking agrees or disagrees with the papers",
        "",
        "Automatic comparisons (mean accuracy after fine-tuning over seeds). A difference is called a "
        "lead only if it exceeds two standard errors of a difference of two binomial accuracies on this "
        "test set (divided by √seeds) *and*, with several seeds, has the same sign on every seed (both "
        "methods start from the same dense weights at each seed, so the comparison is paired); "
        "otherwise it is a tie:",
        "",
    ]
    lines += _ranking_notes({**res, "n_test": cfg["test_subset"] or 10000})
    lines.append("")
    if literature:
        lines += [LITERATURE]
    if cfg.get("discussion"):
        lines += [Path(cfg["discussion"]).read_text().rstrip(), ""]
    est = res.get("full_estimate")
    first_cmd = res.get("commands", [res["command"]])[0]
    full_cmd = "python benchmarks/tradeoff.py --resume"
    lines += [
        "## Reproducing",
        "",
        f"This configuration: `{first_cmd}` (then `python benchmarks/tradeoff.py --docs-only --out "
        f"{cfg['out_display']}` rebuilds the page and plots from the JSON). The full configuration "
        f"({', '.join(FULL['models'])}; seeds {FULL['seeds']}; sparsities {FULL['sparsities']}; MAC "
        f"targets {FULL['mac_targets']}x; dense {FULL['dense_epochs']} epochs on all 60k images; "
        f"{FULL['ft_steps']} fine-tuning steps of batch 128 per point; full 10k test set) is "
        f"`{full_cmd}` (results in `benchmarks/results/tradeoff.json`; interrupted runs continue with "
        "`--resume`, dense weights are cached in `benchmarks/cache/`)."
        + (
            f" Expected runtime on this 2-core CPU machine: about {est['hours_estimate']:.0f} h "
            f"({est['points_per_model_seed']} points per model and seed, "
            f"{est['train_steps_per_model_seed']:,} training steps each; measured step times "
            + ", ".join(f"{k}: {v:.2f} s" for k, v in est["s_per_train_step"].items())
            + " on a machine shared with other jobs, so an idle machine is faster)."
            if est
            else ""
        ),
        "",
    ]
    log(f"plots {', '.join(files)}")
    return lines


def write_docs(results: list[dict], docs: Path, img_dir: Path, grasp: dict | None = None) -> None:
    """One page for several results files (the last one carries the literature notes), and the GraSP
    diagnostic of :func:`grasp_check` when given."""
    names = [r["config"]["label"] for r in results]
    lines: list[str] = [
        "# Accuracy versus compression on Fashion-MNIST",
        "",
        "`benchmarks/tradeoff.py` (issue 4): every unstructured and channel criterion, random as the "
        "baseline, one fine-tuning budget for all methods, torch.ao.pruning's and Torch-Pruning's "
        f"equivalents in the same run. This page holds: {', '.join(names)}. Each section names the "
        "exact command that produced it; the full configuration (full-width ResNet-20 and VGG, all 60k "
        "images, one epoch of fine-tuning per point) is a by-hand run whose command and expected runtime "
        "are under *Reproducing*"
        + ("" if any(r["config"]["prefix"] == "full" for r in results) else " (not run yet)")
        + ". Tables, plots and the automatic comparisons are generated from the JSON files; the "
        "*Reading the results* section is written by hand.",
        "",
    ]
    for i, res in enumerate(results):
        cfg = res["config"]
        body = page(res, img_dir, cfg["prefix"], cfg["label"], literature=i == len(results) - 1)
        lines += ["#" + ln if ln.startswith("#") else ln for ln in body]
    if grasp is not None:
        gc = grasp["config"]
        lines += [
            "## GraSP on trained weights (diagnostic)",
            "",
            f"`{gc['command']}` (results: `benchmarks/results/tradeoff_grasp_check.json`). The seed-0 dense "
            "weights of each model above, pruned one-shot (no fine-tuning) by global magnitude, random, "
            "GraSP in the paper's direction, GraSP inverted, GraSP with the released code's softmax "
            "temperature 200, and |θ⊙Hg|, all scored on the same "
            f"{gc['score_batches']} training batches. Loss and ‖∇L‖² (over the kept conv/linear weights, "
            "BatchNorm in eval mode) are measured on those batches after pruning; accuracy on "
            f"{'the first ' + str(gc['test_subset']) if gc.get('test_subset') else 'all 10k'} test images.",
            "",
            *grasp_table(grasp),
            "",
        ]
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text("\n".join(lines) + "\n")
    log(f"wrote {docs}")


# -------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="small models, 10k-image subset, 1 seed (~10-15 min)"
    )
    ap.add_argument("--models", nargs="+", help="zoo specs, e.g. resnet8:width=0.5,stem_stride=2")
    ap.add_argument("--seeds", nargs="+", type=int)
    ap.add_argument("--sparsities", nargs="+", type=float)
    ap.add_argument("--mac-targets", nargs="+", type=float)
    ap.add_argument("--unstructured", nargs="*", default=list(UNSTRUCTURED), choices=UNSTRUCTURED)
    ap.add_argument("--structured", nargs="*", default=list(STRUCTURED), choices=STRUCTURED)
    ap.add_argument("--train-subset", type=int, help="first N training images (default: all / quick 10k)")
    ap.add_argument("--test-subset", type=int, help="first N test images (default: all 10k / quick 2k)")
    ap.add_argument("--dense-epochs", type=int)
    ap.add_argument("--dense-lr", type=float, default=0.1)
    ap.add_argument("--ft-steps", type=int, help="fine-tuning budget in optimizer steps, the same for all")
    ap.add_argument("--ft-lr", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--score-batches", type=int, help="training batches for data-dependent scores")
    ap.add_argument("--synflow-rounds", type=int, help="SynFlow scoring rounds (paper: 100)")
    ap.add_argument("--no-oneshot-eval", action="store_true", help="skip the accuracy before fine-tuning")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=str(ROOT / "benchmarks" / "cache"))
    ap.add_argument("--name", help="configuration name: plot prefix, page title, default --out suffix")
    ap.add_argument(
        "--out",
        nargs="+",
        help="JSON results (default benchmarks/results/tradeoff_<name>.json); "
        "several with --docs-only: one page for all",
    )
    ap.add_argument("--docs", help="Markdown page (default docs/tradeoff.md)")
    ap.add_argument("--img-dir", default=str(ROOT / "docs" / "img"))
    ap.add_argument("--discussion", help="a Markdown file appended to the page (hand-written write-up)")
    ap.add_argument("--resume", action="store_true", help="keep the points already in --out, run the rest")
    ap.add_argument("--estimate", action="store_true", help="with --docs-only: time the full run's models")
    ap.add_argument("--docs-only", action="store_true", help="only rebuild the page and plots from --out")
    ap.add_argument("--grasp-json", help="with --docs-only: add the --grasp-check results to the page")
    ap.add_argument(
        "--grasp-check",
        metavar="JSON",
        help="only run the GraSP-on-trained-weights diagnostic on the seed-0 dense models, write JSON",
    )
    args = ap.parse_args(argv)

    base = QUICK if args.quick else FULL
    prefix = args.name or ("quick" if args.quick else "full")
    default_out = (
        ROOT / "benchmarks" / "results" / ("tradeoff.json" if prefix == "full" else f"tradeoff_{prefix}.json")
    )
    outs = [Path(o) for o in args.out] if args.out else [default_out]
    out = outs[0]
    docs = Path(args.docs or ROOT / "docs" / "tradeoff.md")
    label = f"{prefix} configuration"
    if args.grasp_check:
        pick = {k: getattr(args, k) for k in base if getattr(args, k, None) is not None}
        gcfg = {**base, **pick, "dense_lr": args.dense_lr, "batch_size": args.batch_size}
        gcfg.update(threads=args.threads, cache_dir=args.cache_dir)
        gcfg["command"] = "python benchmarks/tradeoff.py " + " ".join(sys.argv[1:] if argv is None else argv)
        grasp_check(gcfg, Path(args.grasp_check))
        return
    if args.docs_only:
        results = [json.loads(o.read_text()) for o in outs]
        if args.discussion:
            results[-1]["config"]["discussion"] = args.discussion
        if args.estimate:
            results[-1]["full_estimate"] = estimate_full(args.threads)
            outs[-1].write_text(json.dumps(results[-1], indent=1))
        grasp = json.loads(Path(args.grasp_json).read_text()) if args.grasp_json else None
        write_docs(results, docs, Path(args.img_dir), grasp)
        return
    pick = {k: getattr(args, k) for k in base if getattr(args, k, None) is not None}
    cfg = {
        **base,
        **pick,
        "unstructured": args.unstructured,
        "structured": args.structured,
        "dense_lr": args.dense_lr,
        "ft_lr": args.ft_lr,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "cache_dir": args.cache_dir,
        "eval_oneshot": not args.no_oneshot_eval,
        "prefix": prefix,
        "label": label,
        "discussion": args.discussion,
        "out_display": str(out.resolve().relative_to(ROOT))
        if out.resolve().is_relative_to(ROOT)
        else str(out),
        "command": "python benchmarks/tradeoff.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    res = run(cfg, out, args.resume)
    if args.quick:
        res["full_estimate"] = estimate_full(cfg["threads"])
        out.write_text(json.dumps(res, indent=1))
    write_docs([res], docs, Path(args.img_dir))


if __name__ == "__main__":
    main()
