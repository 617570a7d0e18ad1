"""Training-time pruning methods end to end on Fashion-MNIST, next to magnitude and random at the same budget.

    python benchmarks/methods.py --out benchmarks/results/methods.json          # ~10-15 min on 2 CPU cores
    python benchmarks/methods.py --quick                                      # smoke run, a few minutes

Protocol (one seed; data subsets and few epochs so it runs on a laptop CPU; figures are for comparing
methods under one protocol, not the papers' numbers):

* Data: the first ``--train`` training and ``--test`` test images of Fashion-MNIST (normalised).
* Unstructured (LeNet-5, 80% of every conv/linear weight removed): dense pretraining, then
  magnitude / random masks (per layer) + fine-tuning; ADMM (Zhang et al. 2018: ADMM phase, hard
  prune, masked retraining); hard movement pruning (Sanh et al. 2020: cubic schedule to 80% during
  the method phase, then fine-tuning with the masks fixed).
* Channels (VGG-11-BN at width 0.125, 50% of the channels of every group, removed physically through
  the dependency graph): L1 filter norm and random per group; network slimming (Liu et al. 2017: L1 on
  BN scales, then one global |γ| threshold at the same 50% of channels); SCOP (Tang et al. 2020:
  knockoffs from a small VAE trained here, β learned on the frozen net, per-group removal); redundant
  feature pruning (Ayinde & Zurada 2018, per-group 50% budget); Fisher pruning (Crowley et al. 2018:
  one channel per step, as many channels as L1 removes). Each then gets the same fine-tuning.
* FBS (Gao et al. 2019): VGG at density 0.5 (first conv not gated), trained from the dense weights;
  reported: accuracy, mean per-sample MACs of the gated convs vs dense, batch-1 latency of the masked
  and the skipping path.
* Similarity of each channel-pruned network to its dense parent (gradient CKA, Tang et al. 2020;
  activation CKA of the logits, Kornblith et al. 2019) on 64 test images.

Every method gets ``--method-epochs`` of its own training phase (none for magnitude/random/redundant,
which prune at once) and then ``--ft-epochs`` of fine-tuning; the table lists both.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
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
from secateur.masks import detach_masks, set_mask  # noqa: E402
from secateur.masks.patterns import layer_mask  # noqa: E402
from secateur.methods.admm import ADMM  # noqa: E402
from secateur.methods.fbs import FBS  # noqa: E402
from secateur.methods.fisher_prune import FisherPruner  # noqa: E402
from secateur.methods.movement import Movement  # noqa: E402
from secateur.methods.redundant import prune_redundant  # noqa: E402
from secateur.methods.scop import SCOP, train_knockoff_vae  # noqa: E402
from secateur.methods.slimming import SlimmingPenalty, slim  # noqa: E402
from secateur.scope import Scope  # noqa: E402
from secateur.structured import prune_channels  # noqa: E402
from secateur.train import Trainer  # noqa: E402
from secateur.zoo import create_model  # noqa: E402

X1 = torch.zeros(1, 1, 28, 28)


def train(model, loaders, epochs: int, lr: float = 0.02, callbacks=(), optimizer: str = "sgd") -> float:
    if epochs <= 0:
        return evaluate(model, loaders[1])
    t = Trainer(
        model,
        loaders[0],
        loaders[1],
        epochs=epochs,
        lr=lr,
        optimizer=optimizer,
        callbacks=list(callbacks),
        progress=False,
        weight_decay=5e-4,
        log_every=0,
    )
    t.fit()
    return t.history[-1]["eval_accuracy"]


@torch.no_grad()
def evaluate(model, loader) -> float:
    model.eval()
    correct = seen = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        seen += y.numel()
    return correct / seen


def row(name: str, model, acc: float, dense, t0: float, method_epochs: int, ft_epochs: int, **extra) -> dict:
    p, pd = count_params(model), count_params(dense)
    m, md = count_macs(model, X1), count_macs(dense, X1)
    r = {
        "method": name,
        "accuracy": round(acc, 4),
        "params_kept": round(p["nonzero_params"] / pd["params"], 4),
        "macs_kept": round(m["sparse_macs"] / md["macs"], 4),
        "method_epochs": method_epochs,
        "ft_epochs": ft_epochs,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    r.update(extra)
    print(json.dumps(r), flush=True)
    return r


def unstructured(loaders, dense, args) -> list[dict]:
    out = []
    sp, me, fe = args.sparsity, args.method_epochs, args.ft_epochs
    for crit in ("magnitude", "random"):
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        m = copy.deepcopy(dense)
        for t in Scope().resolve(m):
            w = t.module.weight.detach()
            s = w.abs() if crit == "magnitude" else torch.rand_like(w)
            set_mask(t.module, layer_mask(s, sp, t.name))
        acc = train(m, loaders, fe)
        out.append(row(f"{crit} (unstructured)", detach_masks(m), acc, dense, t0, 0, fe))
    # ADMM through the Trainer callback (penalty gradient by a tensor hook)
    t0 = time.perf_counter()
    m = copy.deepcopy(dense)
    admm = ADMM(
        m, sparsity=sp, rho=1e-3, rho_growth=1.5, rho_max=1.0, update_every=max(1, len(loaders[0]) // 3)
    )
    train(m, loaders, me, callbacks=[admm])
    admm.finalize()
    acc = train(m, loaders, fe)
    out.append(
        row("ADMM", detach_masks(m), acc, dense, t0, me, fe, primal_residual=round(admm.primal_residual(), 4))
    )
    # hard movement pruning in an own loop (scores get their own learning rate, as in Sanh et al.)
    t0 = time.perf_counter()
    m = copy.deepcopy(dense)
    steps = me * len(loaders[0])
    mv = Movement(
        m, sparsity=sp, mode="hard", start=0, end=max(1, int(0.8 * steps)), every=max(1, steps // 20)
    )
    weights = [p for n, p in m.named_parameters() if "scores" not in n]
    opt = torch.optim.Adam([{"params": weights, "lr": 1e-3}, {"params": mv.scores(), "lr": 1e-2}])
    step = 0
    for _ in range(me):
        m.train()
        for x, y in loaders[0]:
            loss = F.cross_entropy(m(x), y) + mv.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            mv.update(step)
    mv.finalize()
    acc = train(m, loaders, fe)
    out.append(row("movement (hard)", detach_masks(m), acc, dense, t0, me, fe))
    return out


def channels(loaders, dense, args) -> list[dict]:
    out = []
    r, me, fe = args.ratio, args.method_epochs, args.ft_epochs
    xs, ys = next(iter(loaders[1]))
    xs, ys = xs[:64], ys[:64]
    dense.eval()

    def finish(name, m, t0, me_used, **extra):
        acc = train(m, loaders, fe)
        m.eval()
        sim = similarity_report(dense, m, xs, ys)
        return row(name, m, acc, dense, t0, me_used, fe, **{k: round(v, 4) for k, v in sim.items()}, **extra)

    removed_by_l1 = 0
    for crit in ("l1", "random"):
        t0 = time.perf_counter()
        m = copy.deepcopy(dense)
        _, plan = prune_channels(m, X1, ratio=r, criterion=crit, seed=args.seed)
        if crit == "l1":
            removed_by_l1 = sum(len(g["removed"]) for g in plan["groups"])
        out.append(finish(f"{'L1 norm' if crit == 'l1' else 'random'} (channels)", m, t0, 0))
    # network slimming: L1 on BN scales during training, then a global |γ| threshold
    t0 = time.perf_counter()
    m = copy.deepcopy(dense)
    train(m, loaders, me, callbacks=[SlimmingPenalty(m, lam=args.slim_lambda)])
    slim(m, X1, ratio=r)
    out.append(finish("network slimming", m, t0, me))
    # SCOP with a VAE knockoff generator trained on the same images
    t0 = time.perf_counter()
    m = copy.deepcopy(dense)
    vae = train_knockoff_vae(loaders[0], epochs=max(1, me), latent=16, hidden=256, seed=args.seed)
    scop = SCOP(m, knockoff=vae)
    scop.fit(loaders[0], steps=me * len(loaders[0]), lr=0.02)
    scop.prune(X1, ratio=r, ranking="group")
    out.append(finish("SCOP", m, t0, me))
    # redundant feature pruning at the same per-group budget
    t0 = time.perf_counter()
    m = copy.deepcopy(dense)
    prune_redundant(m, X1, ratio=r)
    out.append(finish("redundant features", m, t0, 0))
    # Fisher pruning: one channel per step until as many channels as L1 removed are gone
    t0 = time.perf_counter()
    m = copy.deepcopy(dense)
    fp = FisherPruner(m, X1, every=1, total=removed_by_l1)
    epochs = max(1, -(-removed_by_l1 // len(loaders[0])) + 1)
    trainer = Trainer(m, loaders[0], epochs=epochs, lr=0.02, callbacks=[fp], progress=False, log_every=0)
    fp_stop = _StopWhenDone(fp)
    trainer.callbacks.append(fp_stop)
    trainer.fit()
    out.append(finish("Fisher (one at a time)", m, t0, trainer.epoch, channels_removed=len(fp.removed)))
    return out


class _StopWhenDone:
    def __init__(self, fp: FisherPruner) -> None:
        self.fp = fp

    def on_step_end(self, trainer: Any) -> None:
        if len(self.fp.removed) >= self.fp.total:
            trainer.should_stop = True


def fbs_run(loaders, dense, args) -> dict:
    t0 = time.perf_counter()
    m = copy.deepcopy(dense)
    fbs = FBS(m, density=args.fbs_density, lam=1e-4, exclude=["features.0"])
    acc = train(m, loaders, args.method_epochs + args.ft_epochs, callbacks=[fbs])
    x, _ = next(iter(loaders[1]))
    macs = fbs.macs_per_sample(x[:256])
    lat = fbs.latency(x[:1], repeats=30)
    dense_macs = count_macs(dense, X1)["macs"]
    gated_mean = float(macs["gated"].double().mean())
    r = {
        "method": f"FBS (density {args.fbs_density})",
        "accuracy": round(acc, 4),
        "gated_conv_macs_ratio": round(macs["ratio"], 4),
        "network_macs_kept_per_sample": round((dense_macs - macs["dense"] + gated_mean) / dense_macs, 4),
        "latency_b1_masked_ms": round(lat["masked"] * 1e3, 3),
        "latency_b1_skip_ms": round(lat["skip"] * 1e3, 3),
        "method_epochs": args.method_epochs + args.ft_epochs,
        "ft_epochs": 0,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(r), flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=6000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dense-epochs", type=int, default=3)
    ap.add_argument("--method-epochs", type=int, default=2)
    ap.add_argument("--ft-epochs", type=int, default=2)
    ap.add_argument("--sparsity", type=float, default=0.8, help="unstructured: fraction of weights removed")
    ap.add_argument("--ratio", type=float, default=0.5, help="channels: fraction removed per group")
    ap.add_argument("--slim-lambda", type=float, default=1e-3)
    ap.add_argument("--fbs-density", type=float, default=0.5)
    ap.add_argument("--vgg-width", type=float, default=0.125)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.train, args.test, args.dense_epochs, args.method_epochs, args.ft_epochs = 1024, 256, 1, 1, 1
        args.ratio = 0.1  # Fisher removes one channel per step: keep the smoke run short
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    train_l, _ = fashion_mnist_loaders(batch_size=args.batch_size, subset=args.train, seed=args.seed)
    _, test_l = fashion_mnist_loaders(batch_size=args.batch_size, subset=args.test, seed=args.seed)
    loaders = (train_l, test_l)
    results: dict[str, Any] = {"config": vars(args) | {"out": str(args.out)}}

    torch.manual_seed(args.seed)
    lenet = create_model("lenet5")
    results["lenet5_dense_accuracy"] = round(train(lenet, loaders, args.dense_epochs, lr=0.05), 4)
    print("lenet5 dense", results["lenet5_dense_accuracy"], flush=True)
    results["unstructured"] = unstructured(loaders, lenet, args)

    torch.manual_seed(args.seed)
    vgg = create_model("vgg_small", width=args.vgg_width)
    results["vgg_dense_accuracy"] = round(train(vgg, loaders, args.dense_epochs, lr=0.05), 4)
    print("vgg dense", results["vgg_dense_accuracy"], flush=True)
    results["channels"] = channels(loaders, vgg, args)
    results["fbs"] = fbs_run(loaders, vgg, args)
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    results["environment"] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    print("total seconds", results["total_seconds"])
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
