"""Run the vision model matrix (torchvision, timm) and write benchmarks/results/vision_matrix.json.

Each model goes through the main matrix's check (tests_vision/conftest.py). Outcomes: "pass", "partial"
(some groups named and left whole), "refused" (a named GraphError / UnsupportedOpError), "failed" (any other
exception: a wrong model or a crash), "timeout", "large" (skipped: over the parameter limit unless --all).
A model refused because modules ran only in train mode (UntracedModuleError: auxiliary heads) is checked
again with the graph traced in train mode; its record keeps the refusal ("untraced", "train_size").
Run it in .venv-vision:

    .venv-vision/bin/python scripts/vision_matrix_report.py [--only torchvision|timm] [--all] [--timeout 120]

It also prints the input size each model needed and the smallest timm model of each family (the tests pin
both).
"""

from __future__ import annotations

import argparse
import copy
import json
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests_vision"))
sys.path.insert(1, str(ROOT / "tests" / "graph"))

import conftest as vision  # noqa: E402  (tests_vision/conftest.py)

SIZES = (64, 96, 128, 160, 224, 256, 299, 384)


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def n_params_meta(build) -> int:
    with torch.device("meta"):
        m = build()
    return sum(p.numel() for p in m.parameters())


def min_size(model, sizes=SIZES, train: bool = False) -> int | None:
    """The smallest side in ``sizes`` at which a forward works: eval mode, batch 1; or (``train``) train mode
    on a copy (running statistics untouched), batch 2 (BatchNorm's batch statistics need two values)."""
    if train:
        model = copy.deepcopy(model).train()
    for s in sizes:
        try:
            with torch.no_grad():
                (model if train else model.eval())(torch.randn(2 if train else 1, 3, s, s))
            return s
        except Exception:
            continue
    return None


def train_mode_outcome(rec: dict, model, sizes) -> None:
    """After a default refusal that names modules no eval-mode trace reached (UntracedModuleError: e.g.
    auxiliary heads that run only in training), the check again with the graph traced in train mode
    (tests_vision/conftest.py ``x_train``); the record keeps the default refusal under "untraced"."""
    size = min_size(model, sizes, train=True)
    if size is None:
        return
    rec["untraced"], rec["train_size"] = rec.pop("error", "")[:300], size
    x = torch.randn(1, 3, rec["size"], rec["size"])
    rec["outcome"], msg = vision.outcome(model, x, x_train=torch.randn(2, 3, size, size))
    if msg:
        rec["error"] = msg[:500]


def run_one(name, build, sizes, timeout, allow_large) -> dict:
    rec: dict = {"model": name}
    t0 = time.perf_counter()
    slow = name.split(":")[-1] in slow_models()
    if slow and not allow_large:  # as the tests: only with --all
        rec["outcome"] = "large"
        rec["error"] = "slow: too many parameters to build just to count them; run with --all"
        return rec
    try:
        rec["params"] = n_params_meta(build)
    except Exception as e:
        rec["meta_error"] = f"{type(e).__name__}: {e}"[:300]
        # as the tests: count on a real build (RegNet computes its widths with tensor ops)
        rec["params"] = None if slow else sum(p.numel() for p in build().parameters())
    if rec["params"] and rec["params"] > vision.LARGE_PARAMS and not allow_large:
        rec["outcome"] = "large"
        return rec
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        torch.manual_seed(0)
        model = build().eval()
        size = min_size(model, sizes)
        rec["size"] = size
        if size is None:
            rec["outcome"], rec["error"] = "no_input", f"no forward at sizes {sizes}"
            return rec
        x = torch.randn(1, 3, size, size)
        rec["outcome"], msg = vision.outcome(model, x)
        if msg:
            rec["error"] = msg[:500]
        if msg.startswith("UntracedModuleError"):
            train_mode_outcome(rec, model, sizes)
    except _Timeout:
        rec["outcome"], rec["error"] = "timeout", f"over {timeout} s"
    except Exception as e:
        rec["outcome"] = "failed"
        rec["error"] = f"{type(e).__name__}: {e}"[:500]
        rec["where"] = traceback.format_exc(limit=-3)[-800:]
    finally:
        signal.alarm(0)
        rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def slow_models() -> set[str]:
    """Models the tests run only with SECATEUR_VISION_ALL=1 (the tests' SLOW sets): here only with --all."""
    import test_timm_matrix
    import test_torchvision_matrix

    return set(test_torchvision_matrix.SLOW) | set(test_timm_matrix.SLOW)


def torchvision_specs():
    import torchvision

    for name in torchvision.models.list_models(module=torchvision.models):
        yield name, (lambda n=name: torchvision.models.get_model(n, weights=None))


def timm_smallest_per_family() -> dict[str, tuple[str, int]]:
    """family (timm.models.<module>) -> (model with the fewest parameters, its parameter count)."""
    import timm

    best: dict[str, tuple[str, int]] = {}
    for module in timm.list_modules():
        for name in timm.list_models(module=module):
            try:
                n = n_params_meta(lambda n=name: timm.create_model(n, pretrained=False))
            except Exception:
                continue
            if module not in best or n < best[module][1]:
                best[module] = (name, n)
    return best


def pinned_families() -> dict[str, tuple[str, int]]:
    """The families pinned in tests_vision/test_timm_matrix.py (parameter counts recounted on meta)."""
    import timm
    from test_timm_matrix import FAMILIES

    return {
        fam: (name, n_params_meta(lambda n=name: timm.create_model(n, pretrained=False)))
        for fam, name in FAMILIES.items()
    }


def timm_specs(families: dict[str, tuple[str, int]]):
    import timm

    for fam, (name, _) in sorted(families.items()):
        yield f"{fam}:{name}", (lambda n=name: timm.create_model(n, pretrained=False))


def summarize(records: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for r in records:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["torchvision", "timm"])
    ap.add_argument("--all", action="store_true", help="also models over conftest.LARGE_PARAMS")
    ap.add_argument("--timeout", type=int, default=180)
    ap.add_argument(
        "--recompute-families",
        action="store_true",
        help="choose the smallest model of each timm family again (builds all ~1400 on meta: minutes)",
    )
    ap.add_argument("--models", nargs="+", help="re-run only these models (others kept from --out)")
    ap.add_argument("--reverse", action="store_true", help="reverse order (second worker)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vision_matrix.json"))
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    import torchvision

    result.setdefault("versions", {}).update(torch=torch.__version__, torchvision=torchvision.__version__)
    suites = [args.only] if args.only else ["torchvision", "timm"]
    for suite in suites:
        if suite == "torchvision":
            specs = list(torchvision_specs())
        else:
            import timm

            result["versions"]["timm"] = timm.__version__
            fams = timm_smallest_per_family() if args.recompute_families else pinned_families()
            result["timm_families"] = {k: v[0] for k, v in sorted(fams.items())}
            specs = list(timm_specs(fams))
        if args.reverse:
            specs = specs[::-1]
        old = {r["model"]: r for r in result.get(suite, {}).get("models", [])}
        total = len(specs)
        if args.models:  # re-run only these; keep the other records
            specs = [(n, b) for n, b in specs if n in args.models or n.split(":")[-1] in args.models]
            records = [r for r in old.values() if r["model"] not in {n for n, _ in specs}]
        else:
            records = []
        for name, build in specs:
            rec = run_one(name, build, SIZES, args.timeout, args.all)
            records.append(rec)
            err = rec.get("error", "")[:160]
            line = f"{suite} {name}: {rec['outcome']} {rec.get('size')} {rec.get('seconds')}s {err}"
            print(line, flush=True)
            records.sort(key=lambda r: r["model"])
            result[suite] = {"counts": summarize(records), "total": total, "models": records}
            out_path.write_text(json.dumps(result, indent=1) + "\n")
        print(suite, summarize(records), flush=True)


if __name__ == "__main__":
    main()
