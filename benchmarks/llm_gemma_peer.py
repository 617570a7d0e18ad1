"""llm-compressor's SparseGPT and Wanda on Gemma 3 270M: the peer rows of ``benchmarks/llm_gemma.py``.

Runs in its *own* virtual environment, because llm-compressor pins an older transformers than secateur's
(llmcompressor 0.14 needs transformers <= 5.17; secateur's environment has 5.24). Nothing from secateur is
imported here: the calibration and held-out token windows come from ``llm_gemma.py`` (a safetensors file,
the very windows secateur's rows use), and perplexity is computed by the same rule as
``secateur.llm.perplexity`` (every position of a window predicts the next token, NLL summed in float64).
The dense perplexity is computed here too, as a check that both environments measure the same thing.

Set-up (once; ~2 min, registry only)::

    python3.11 -m venv /work/venvs/llmc
    /work/venvs/llmc/bin/pip install torch==2.13.0
    /work/venvs/llmc/bin/pip install llmcompressor gguf accelerate

Usage (``llm_gemma.py --only peer`` calls it)::

    /work/venvs/llmc/bin/python benchmarks/llm_gemma_peer.py MODEL_DIR TOKENS.safetensors OUT.json
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

#: (row name, llm-compressor modifier class name, sparsity, mask structure)
RUNS = (
    ("llmcompressor-sparsegpt", "SparseGPTModifier", 0.5, "0:0"),
    ("llmcompressor-wanda", "WandaPruningModifier", 0.5, "0:0"),
)


def perplexity(model: torch.nn.Module, ids: torch.Tensor, batch: int) -> float:
    """``exp(mean NLL)`` of next-token prediction over every position of the ``(n, L)`` windows."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch):
            x = ids[i : i + batch]
            logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, :-1].double()
            nll += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
                )
            )
            count += x[:, 1:].numel()
    return math.exp(nll / count)


def load(model_dir: str) -> torch.nn.Module:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def sparsity_of_linears(model: torch.nn.Module) -> float:
    """Zero fraction of the decoder blocks' Linear weights (what both libraries prune)."""
    zeros = total = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}":
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return zeros / max(total, 1)


def run_one(model_dir: str, calib: torch.Tensor, held: torch.Tensor, spec: tuple, batch: int) -> dict:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers import pruning

    name, cls, sparsity, structure = spec
    model = load(model_dir)
    data = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    modifier = getattr(pruning, cls)(
        sparsity=sparsity, mask_structure=structure, targets=["Linear"], ignore=["re:.*lm_head"]
    )
    t0 = time.perf_counter()
    oneshot(
        model=model,
        recipe=[modifier],
        dataset=data,
        num_calibration_samples=calib.shape[0],
        max_seq_length=calib.shape[1],
        shuffle_calibration_samples=False,
        pipeline="sequential",
    )
    seconds = time.perf_counter() - t0
    return {
        "kind": "oneshot",
        "method": name,
        "sparsity": sparsity,
        "kd_steps": 0,
        "status": "ok",
        "prune_seconds": seconds,
        "achieved_sparsity": sparsity_of_linears(model),
        "ppl": perplexity(model, held, batch),
    }


def main() -> None:
    from safetensors.torch import load_file

    model_dir, tokens, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    batch = int(sys.argv[5]) if len(sys.argv) > 5 else 4
    torch.set_num_threads(threads)
    t = load_file(tokens)
    calib, held = t["calibration"], t["heldout"]
    import llmcompressor
    import transformers

    res: dict = {
        "llmcompressor": llmcompressor.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dense_ppl": perplexity(load(model_dir), held, batch),
        "rows": [],
    }
    for spec in RUNS:
        try:
            res["rows"].append(run_one(model_dir, calib, held, spec, batch))
        except Exception as exc:  # noqa: BLE001 - the peer's failure is the row, with its error
            res["rows"].append(
                {
                    "kind": "oneshot",
                    "method": spec[0],
                    "sparsity": spec[2],
                    "kd_steps": 0,
                    "status": "not run",
                    "reason": f"{type(exc).__name__}: {exc}",
                }
            )
        out.write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps(res["rows"][-1]), flush=True)


if __name__ == "__main__":
    main()
