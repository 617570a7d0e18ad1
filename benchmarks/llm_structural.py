"""Structural pruning of a small Llama-style decoder (LLM-Pruner style): params, MACs, latency, perplexity.

Run by hand (CPU, about 15 minutes on a busy 2-core machine; the trained model is cached):

    nice -n 19 env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm_structural.py

What it does:
* trains a byte-level Llama (transformers ``LlamaForCausalLM``: 6 layers, 192 wide, 12 query heads over 6
  KV heads (GQA), MLP 512) on the calibration half of the Debian fortunes (the held-out half is never
  trained on), like the GPT-2 of ``benchmarks/llm_oneshot.py``;
* prunes it with :func:`secateur.llm.prune_decoder` at per-group sparsities 0.2 and 0.5 inside layers 1-4
  (the first and last layer kept, as LLM-Pruner does) by ``llm_pruner`` (LLM-Pruner's Taylor importance,
  element-wise first order), ``wanda_sp`` (Wanda-sp) and ``random``, each with three seeds (the 10
  calibration windows of 128 bytes, LLM-Pruner's count, are drawn per seed; random draws its scores per
  seed). No fine-tuning after pruning;
* reports parameters, MACs of one 128-byte sequence, byte-level perplexity on held-out text, and CPU
  latency of one forward pass on a (1, 128) and an (8, 128) batch, dense and every pruned model (seed 0)
  timed interleaved in one run (:func:`secateur.analysis.latency.compare_callables`, median over blocks);
* a mixture-of-experts row: a tiny Mixtral (random init) with half its experts removed by
  :func:`secateur.llm.remove_experts`: parameters and latency (the compute per token is set by top-k, so
  removing experts shrinks memory, not time).

Writes benchmarks/results/llm_structural.json; ``--markdown`` prints the table for docs.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "llm_structural.json"
CACHE = ROOT / "benchmarks" / "cache"
COMMAND = "nice -n 19 env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm_structural.py"

SEQ = 128
MODEL = dict(
    vocab_size=256,
    hidden_size=192,
    num_hidden_layers=6,
    num_attention_heads=12,
    num_key_value_heads=6,
    intermediate_size=512,
    max_position_embeddings=SEQ,
    bos_token_id=10,
    eos_token_id=10,
    tie_word_embeddings=False,
)
SPARSITIES = (0.2, 0.5)
CRITERIA = ("llm_pruner", "wanda_sp", "random")
LAYERS = (1, 2, 3, 4)


def _bytes(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


@torch.no_grad()
def perplexity(model, data: torch.Tensor) -> float:
    """Byte-level perplexity over non-overlapping windows of SEQ bytes (each predicts SEQ - 1)."""
    n = (data.numel() // SEQ) * SEQ
    windows = data[:n].view(-1, SEQ)
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], 32):
        ids = windows[i : i + 32]
        out = model(input_ids=ids, labels=ids, use_cache=False)
        k = ids.numel() - ids.shape[0]
        total += out.loss.item() * k
        count += k
    return float(torch.exp(torch.tensor(total / count)))


def train_dense(train: torch.Tensor, steps: int, seed: int = 0):
    """Train (or load from benchmarks/cache) the byte-level Llama; returns (model, info)."""
    import transformers

    key = hashlib.sha1(json.dumps([MODEL, steps, seed, train.numel()], sort_keys=True).encode()).hexdigest()
    path = CACHE / f"llama_bytes_{key[:10]}"
    if (path / "config.json").exists():
        model = transformers.LlamaForCausalLM.from_pretrained(path).eval()
        info = json.loads((path / "train_info.json").read_text())
        return model, info
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODEL))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        starts = torch.randint(0, train.numel() - SEQ, (16,), generator=g)
        ids = torch.stack([train[s : s + SEQ] for s in starts.tolist()])
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            print(f"train step {step} loss {loss.item():.3f}", flush=True)
    info = {"train_steps": steps, "train_seconds": time.perf_counter() - t0, "batch": f"16 x {SEQ} bytes"}
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    (path / "train_info.json").write_text(json.dumps(info))
    return model, info


def _calibration(train: torch.Tensor, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    starts = torch.randint(0, train.numel() - SEQ, (n,), generator=g).tolist()
    ids = torch.stack([train[s : s + SEQ] for s in starts])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _shape(model) -> dict:
    layers = model.model.layers
    return {
        "q_heads": [lay.self_attn.q_proj.out_features // model.config.head_dim for lay in layers],
        "kv_heads": [lay.self_attn.k_proj.out_features // model.config.head_dim for lay in layers],
        "mlp": [lay.mlp.up_proj.out_features for lay in layers],
    }


def _latency(models: dict, batches: dict[str, torch.Tensor], threads: int, repeats: int) -> dict:
    """{batch label: {model label: median ms}}, every model timed interleaved with the others."""
    from secateur.analysis.latency import compare_callables

    out = {}
    for label, ids in batches.items():

        def make(m, x=ids):
            def fn():
                with torch.no_grad():
                    return m(input_ids=x, use_cache=False)

            return fn

        res = compare_callables(
            {k: make(m) for k, m in models.items()}, threads=threads, repeats=repeats, block_ms=20.0
        )
        out[label] = {k: {"median_ms": v["median_ms"], "iqr_ms": v["iqr_ms"]} for k, v in res.items()}
        print("latency", label, {k: round(v["median_ms"], 3) for k, v in res.items()}, flush=True)
    return out


def moe_experiment(threads: int, repeats: int) -> dict:
    """Tiny Mixtral (random init): half the experts removed by router-weighted activation saliency."""
    import transformers

    from secateur.analysis import count_params
    from secateur.analysis.latency import compare_latency
    from secateur.llm import remove_experts

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=256,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=256,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=SEQ,
    )
    dense = transformers.MixtralForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 256, (8, SEQ), generator=g)
    pruned, plan = remove_experts(copy.deepcopy(dense), calib, sparsity=0.5)
    x = {"input_ids": torch.randint(0, 256, (1, SEQ), generator=g), "use_cache": False}
    lat = compare_latency(dense, pruned, x, threads=threads, repeats=repeats, block_ms=20.0)
    return {
        "model": "Mixtral (MixtralForCausalLM), random init, 4 layers, 128 wide, 8 experts, top-2",
        "removed": "4 of 8 experts per layer (lowest router-weighted activation saliency, 8 random texts)",
        "params_dense": count_params(dense)["params"],
        "params_pruned": count_params(pruned)["params"],
        "num_local_experts": pruned.config.num_local_experts,
        "latency_ms_dense": lat["dense"]["median_ms"],
        "latency_ms_pruned": lat["pruned"]["median_ms"],
        "speedup": lat["speedup"],
    }


def run(args: argparse.Namespace) -> dict:
    from secateur.analysis import count_macs, count_params
    from secateur.llm import load_fortunes, prune_decoder

    torch.set_num_threads(args.threads)
    split = load_fortunes(seed=0)
    train, held = _bytes("\n".join(split.calibration)), _bytes("\n".join(split.heldout))
    held = held[: args.heldout_bytes]
    dense, info = train_dense(train, args.steps)
    x1 = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(7))
    macs = lambda m: count_macs(m, {"input_ids": x1, "use_cache": False})["macs"]  # noqa: E731
    p_dense, m_dense = count_params(dense)["params"], macs(dense)
    ppl_dense = perplexity(dense, held)
    print(f"dense params {p_dense} MACs {m_dense} ppl {ppl_dense:.3f}", flush=True)
    rows, timed = [], {"dense": dense}
    for sparsity in SPARSITIES:
        for crit in CRITERIA:
            per_seed = []
            for seed in range(args.seeds):
                model = copy.deepcopy(dense)
                t0 = time.perf_counter()
                model, plan = prune_decoder(
                    model,
                    _calibration(train, args.n_calib, seed),
                    sparsity,
                    layers=LAYERS,
                    criterion=crit,
                    seed=seed,
                )
                secs = time.perf_counter() - t0
                ppl = perplexity(model, held)
                per_seed.append({"seed": seed, "perplexity": ppl, "prune_seconds": secs})
                print(f"{crit} sparsity {sparsity} seed {seed}: ppl {ppl:.3f} ({secs:.1f} s)", flush=True)
                if seed == 0:
                    timed[f"{crit} {sparsity}"] = model
                    first = model
            ppls = [r["perplexity"] for r in per_seed]
            rows.append(
                {
                    "criterion": crit,
                    "sparsity": sparsity,
                    "params": count_params(first)["params"],
                    "params_fraction": count_params(first)["params"] / p_dense,
                    "macs": macs(first),
                    "macs_fraction": macs(first) / m_dense,
                    "perplexity_median": statistics.median(ppls),
                    "perplexity_min": min(ppls),
                    "perplexity_max": max(ppls),
                    "shape": _shape(first),
                    "seeds": per_seed,
                }
            )
    batches = {
        "1x128": x1,
        "8x128": torch.randint(0, 256, (8, SEQ), generator=torch.Generator().manual_seed(8)),
    }
    latency = _latency(timed, batches, args.threads, args.repeats)
    for r in rows:
        key = f"{r['criterion']} {r['sparsity']}"
        for b in batches:
            r[f"latency_ms_{b}"] = latency[b][key]["median_ms"]
            r[f"speedup_{b}"] = latency[b]["dense"]["median_ms"] / latency[b][key]["median_ms"]
    return {
        "command": COMMAND,
        "model": "byte-level Llama (transformers LlamaForCausalLM), 6 layers, 192 wide, "
        "12 heads / 6 KV heads, MLP 512, untied embeddings",
        "train": info,
        "train_bytes": train.numel(),
        "heldout_bytes": held.numel(),
        "calibration": f"{args.n_calib} windows of {SEQ} bytes of the training text per seed",
        "layers_pruned": list(LAYERS),
        "seeds": args.seeds,
        "dense": {
            "params": p_dense,
            "macs": m_dense,
            "perplexity": ppl_dense,
            **{f"latency_ms_{b}": latency[b]["dense"]["median_ms"] for b in batches},
        },
        "rows": rows,
        "moe": moe_experiment(args.threads, args.repeats),
        "environment": {
            "torch": torch.__version__,
            "threads": args.threads,
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "latency": f"median of {args.repeats} interleaved blocks of >= 20 ms, torch.no_grad, eval",
        },
    }


def markdown(res: dict) -> str:
    d = res["dense"]
    lines = [
        f"{res['model']}, trained {res['train']['train_steps']} steps ({res['train']['batch']}, "
        f"{res['train']['train_seconds']:.0f} s) on the calibration half of the fortunes; pruned in layers "
        f"{res['layers_pruned'][0]}-{res['layers_pruned'][-1]} of 6 with {res['calibration']}, "
        "no fine-tuning. "
        f"Perplexity: bytes, held-out half ({res['heldout_bytes']} bytes), median [min, max] over "
        f"{res['seeds']} seeds. Latency: one forward pass, {res['environment']['threads']} thread, "
        f"{res['environment']['latency']}; all models timed in one run.",
        "",
        "| criterion | sparsity | params | MACs (1x128) | perplexity | latency 1x128 ms (speed-up) "
        "| latency 8x128 ms (speed-up) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| dense | - | {d['params']:,} | {d['macs'] / 1e6:.1f} M | {d['perplexity']:.2f} | "
        f"{d['latency_ms_1x128']:.2f} | {d['latency_ms_8x128']:.2f} |",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['criterion']} | {r['sparsity']} | {r['params']:,} ({r['params_fraction']:.0%}) | "
            f"{r['macs'] / 1e6:.1f} M ({r['macs_fraction']:.0%}) | {r['perplexity_median']:.2f} "
            f"[{r['perplexity_min']:.2f}, {r['perplexity_max']:.2f}] | "
            f"{r['latency_ms_1x128']:.2f} ({r['speedup_1x128']:.2f}x) | "
            f"{r['latency_ms_8x128']:.2f} ({r['speedup_8x128']:.2f}x) |"
        )
    m = res["moe"]
    lines += [
        "",
        f"Mixture of experts: {m['model']}; {m['removed']}: parameters {m['params_dense']:,} -> "
        f"{m['params_pruned']:,} ({m['params_pruned'] / m['params_dense']:.0%}), config num_local_experts "
        f"{m['num_local_experts']}, latency (1x128) {m['latency_ms_dense']:.2f} -> "
        f"{m['latency_ms_pruned']:.2f} ms ({m['speedup']:.2f}x).",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="training steps of the dense model")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n-calib", type=int, default=10, help="calibration windows per seed (LLM-Pruner: 10)")
    ap.add_argument("--heldout-bytes", type=int, default=32768)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--markdown", action="store_true", help="print the table of the saved JSON and exit")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(RESULTS.read_text())))
        return
    random.seed(0)
    res = run(args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1))
    print(markdown(res))


if __name__ == "__main__":
    main()
