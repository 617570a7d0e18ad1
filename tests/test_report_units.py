"""Report and CLI summaries say each quantity in its own unit (issue 16, new-user findings of session 5).

- the headline states parameters and non-zero parameters separately, each dense → pruned with the ratio
  of like to like, equal to the table's dense / pruned cell;
- a cosine's change is its absolute change, an accuracy's is in points; the metric plot is named after it;
- sizes are in MiB (2**20 bytes) everywhere, console included;
- a dense accuracy near chance is flagged in the report headline;
- an unknown recipe name gets a "did you mean" and nothing is written;
- ``collect_results(deployment=...)`` measures both models in every runtime and the report renders it.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from secateur.analysis.report import build_report, collect_results, headline, metric_change_text, summary_rows
from secateur.app.cli import main


def _results(dense: dict, pruned: dict, **extra) -> dict:
    return {"dense": dense, "pruned": pruned, **extra}


def _table(res: dict) -> dict[str, str]:
    return {row[0]: row[3] for row in summary_rows(res)}


def test_headline_ratios_compare_like_with_like_and_match_the_table() -> None:
    # A compacted model whose dense twin already holds zeros (BatchNorm biases start at 0).
    res = _results({"params": 77_754, "nonzero_params": 77_418, "macs": 1000},
                   {"params": 39_736, "nonzero_params": 39_736, "macs": 500})
    size = dict(headline(res))["size"]
    table = _table(res)
    assert table["parameters"] == f"{77_754 / 39_736:.2f}x" == "1.96x"
    assert table["non-zero parameters"] == f"{77_418 / 39_736:.2f}x" == "1.95x"
    assert f"parameters 77,754 → 39,736 ({table['parameters']} fewer)" in size
    assert f"non-zero parameters 77,418 → 39,736 ({table['non-zero parameters']} fewer)" in size
    assert "2.00x fewer MACs" in size
    # A masked model: same parameter count, fewer non-zeros; the headline does not divide across them.
    res = _results({"params": 1000, "nonzero_params": 1000}, {"params": 1000, "nonzero_params": 125})
    size = dict(headline(res))["size"]
    assert size == "parameters 1,000 (unchanged); non-zero parameters 1,000 → 125 (8.00x fewer)"


def test_metric_changes_in_their_own_unit() -> None:
    assert metric_change_text("accuracy", 0.095, 0.173) == "+7.80 points"
    assert metric_change_text("embedding cosine", 1.0, 0.7213) == "-0.2787"
    assert metric_change_text("cosine", 0.9, 0.95) == "+0.0500"
    assert metric_change_text("perplexity", 20.0, 26.0) == "+30.0%"
    res = _results({"accuracy": 1.0, "params": 10, "nonzero_params": 10},
                   {"accuracy": 0.7213, "params": 8, "nonzero_params": 8}, metric_name="embedding cosine")
    assert dict(headline(res))["metric"] == "embedding cosine 1.0000 → 0.7213, -0.2787 (worse)"


def test_report_flags_a_dense_model_near_chance_and_names_the_plot_after_the_metric(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    res = _results({"accuracy": 0.095, "params": 100, "nonzero_params": 100},
                   {"accuracy": 0.173, "params": 50, "nonzero_params": 50}, chance=0.1)
    metric = dict(headline(res))["metric"]
    assert metric.startswith("accuracy 0.0950 → 0.1730, +7.80 points (better); "
                             "the dense model is near chance (0.10)")
    res["dense"]["accuracy"] = 0.85  # a trained model: no flag
    assert "near chance" not in dict(headline(res))["metric"]
    res = _results({"accuracy": 1.0, "params": 100, "nonzero_params": 100},
                   {"accuracy": 0.72, "params": 50, "nonzero_params": 50}, metric_name="embedding cosine")
    md = build_report(res, tmp_path)["md"].read_text()
    assert "![Embedding cosine vs compression](report_accuracy_vs_compression.png)" in md
    assert "Accuracy vs compression" not in md and "points" not in md


def test_sizes_are_binary_units_everywhere() -> None:
    from secateur.app.summary import human_bytes, size_change

    assert human_bytes(90_870_000) == f"{90_870_000 / 2**20:.2f} MiB" == "86.66 MiB"
    assert human_bytes(512) == "512 B" and human_bytes(2048) == "2.00 KiB"
    assert human_bytes(3 * 2**30) == "3.00 GiB"
    assert size_change(4 * 2**20, 2**20) == "4.00x smaller" and size_change(1, 2) == "2.00x larger"
    # equal or nearly equal sizes (a 2:4 model saved densely: the plan grows a little) are not "1.00x larger"
    assert size_change(5, 5) == "same" and size_change(15_928_000, 15_929_000) == "about the same"
    # two sizes side by side share the larger one's unit
    assert human_bytes(336_802, like=1_111_000) == f"{336_802 / 2**20:.2f} MiB" == "0.32 MiB"
    assert human_bytes(336_802, like=336_802) == "328.91 KiB"
    res = _results({"file_bytes": 90_870_000}, {"file_bytes": 83_220_000})
    assert _table(res)["size on disk, safetensors (MiB)"] == f"{90_870_000 / 83_220_000:.2f}x"
    assert "safetensors file 86.66 → 79.36 MiB" in dict(headline(res))["size"]


def test_prune_summary_says_what_was_removed_against_what_was_asked() -> None:
    from secateur.app.cli import _removed_sentence

    m = {"sparsity": 0.2857, "recipe": {"granularity": "channel", "target": "channels", "sparsity": 0.3}}
    assert _removed_sentence(m) == "removed 28.6% of the channels (recipe: 30%)"
    m = {"sparsity": 0.9, "recipe": {"granularity": "element", "target": "weights", "sparsity": 0.9}}
    assert _removed_sentence(m) == "removed 90.0% of the weights in scope (recipe: 90%)"


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_unknown_recipe_name_gets_did_you_mean_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("the user's file")
    before = _tree_digest(tmp_path)
    res = CliRunner().invoke(main, ["prune", "--model", "zoo:lenet5", "--recipe", "gmp9",
                                    "--out", str(tmp_path / "run")])
    assert res.exit_code == 1
    assert "recipe 'gmp9' is neither a file nor a shipped recipe (did you mean 'gmp90'?)" in res.output
    assert "'l1_filters_30'" in res.output  # every shipped name is listed too
    assert _tree_digest(tmp_path) == before and not (tmp_path / "run").exists()


def test_collect_results_with_deployment_measures_both_models_in_every_runtime(tmp_path: Path) -> None:
    for mod in ("onnx", "onnxscript", "onnxruntime", "matplotlib"):
        pytest.importorskip(mod)
    from secateur.analysis.deploy import weights_file

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).train()
    pruned = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).train()
    before = copy.deepcopy(dense.state_dict())
    res = collect_results(
        dense, pruned, torch.randn(3, 16), latency=False, memory=False, sizes=False, progress=False,
        deployment={"batch_sizes": (2,), "repeats": 2, "warmup": 1, "block_ms": 1.0, "compiled": None},
    )
    assert dense.training and pruned.training  # modes restored
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items())
    rows = res["deployment"]
    runtimes = ("eager", "onnxruntime-fp32", "onnxruntime-int8")
    assert [(r["model"], r["runtime"], r["batch_size"]) for r in rows] == [
        (m, rt, 2) for m in ("dense", "pruned") for rt in runtimes
    ]
    for r in rows:
        assert r["n"] == 2 and r["threads"] == 1 and r["q1_ms"] <= r["median_ms"] <= r["q3_ms"]
        if r["runtime"] == "onnxruntime-fp32":
            assert r["check"]["within_tolerance"], r
    int8 = [r for r in rows if r["runtime"] == "onnxruntime-int8"]
    assert {r["quantization"] for r in int8} == {"dynamic"}  # no convolution, no calibration: dynamic
    eager = {r["model"]: r["size_bytes"] for r in rows if r["runtime"] == "eager"}
    for name, model in (("dense", dense), ("pruned", pruned)):
        assert eager[name] == weights_file(model, tmp_path / f"{name}.safetensors").stat().st_size
    assert eager["pruned"] < eager["dense"]
    out = build_report(res, tmp_path / "report")
    md = out["md"].read_text()
    assert "## Deployment: runtimes side by side" in md
    for r in rows:
        line = (f"| {r['model']} | {r['runtime']} | {r['batch_size']} | {r['median_ms']:.3f} ± "
                f"{r['iqr_ms']:.3f} | {r['speedup']:.2f}x | {r['size_bytes'] / 2**20:.2f} |")
        assert line in md
    assert "<h2>Deployment: runtimes side by side</h2>" in out["html"].read_text()


def test_prune_summary_sizes_dense_and_pruned_in_mib() -> None:
    from secateur.app.cli import _prune_summary

    counts = {"params": 100, "nonzero_params": 100, "macs": 1000, "sparse_macs": 1000}
    m = {"model": "hf:/m", "kind": "text encoder", "data": "d", "input_spec": "int64[1,8]",
         "inputs_from": "x", "metric": "cosine", "chance": None, "bn_batches": 0, "sparsity": 0.5,
         "macs_ratio": 1.0,
         "saved": "runs/x/model", "saved_bytes": 2 * 2**20, "dense_bytes": 8 * 2**20,
         "recipe": {"granularity": "2:4", "target": "weights"},
         "compressed": {"format": "sparse-24-bitmask", "bytes": 2**20, "path": "runs/x/c.safetensors"},
         "dense": {**counts, "cosine": 1.0}, "pruned": {**counts, "cosine": 0.9}}
    text = _prune_summary(m, "wanda_2_4", "runs/x")
    size = next(line for line in text.splitlines() if line.startswith("size on disk"))
    assert size.split()[-6:] == ["8.00", "MiB", "2.00", "MiB", "4.00x", "smaller"]
    comp = next(line for line in text.splitlines() if "sparse-24-bitmask" in line and "MiB" in line)
    assert comp.rstrip().endswith("1.00 MiB  2.00x smaller than saved")
    assert "removed 50.0% of the weights in scope" in text and "stores the zeros densely" in text
    assert " MB" not in text


def test_fashion_mnist_subset_says_how_many_images_of_each_split() -> None:
    from secateur.app.datasources import load_task_data
    from secateur.app.inputs import parse_input_spec

    data = load_task_data("fashion-mnist", parse_input_spec("float32[1,1,28,28]"), subset=300)
    assert sum(len(y) for _, y in data.test) == sum(len(y) for _, y in data.train) == 300
    assert data.description == (
        "the first 300 Fashion-MNIST test images (and the first 300 training images)"
    )
    assert data.evaluated_on == "the first 300 Fashion-MNIST test images"  # what report and eval measure on


class _Sleeper(nn.Module):
    """A forward that takes at least ``seconds`` (sleeps), for the latency estimate."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(self.seconds)
        return x


def test_report_latency_stage_estimates_its_duration() -> None:
    import re

    from secateur.app.reports import _latency_estimate

    x = torch.zeros(1, 2)
    text = _latency_estimate(_Sleeper(0.02), _Sleeper(0.01), x, repeats=30)
    at_least = int(re.search(r"at least (\d+) s", text).group(1))
    assert at_least >= int((30 + 3 + 1) * 0.03) and "makes it quick" not in text
    assert re.match(r"one forward takes (\d+) ms dense, (\d+) ms pruned", text)
    assert "--batch 1 --repeats 3 makes it quick" in _latency_estimate(_Sleeper(0.02), _Sleeper(0.02), x, 800)
    assert _latency_estimate(nn.Identity(), nn.Identity(), x, 3) == "under a second"


def test_report_builds_a_fresh_dense_model_as_prune_built_it(tmp_path, monkeypatch) -> None:
    """``secateur prune --model zoo:lenet5`` then ``report --dense zoo:lenet5``: the report's dense model is
    built under the recipe's recorded seed, so it has the initial weights of the model prune started from
    (not another random draw), and its accuracy is the dense accuracy prune printed."""
    import json

    import secateur.app.models as models
    from secateur.train import seed_everything
    from secateur.zoo import create_model

    run = tmp_path / "run"
    res = CliRunner().invoke(main, ["prune", "--model", "zoo:lenet5", "--recipe", "l1_filters_30", "--subset",
                                    "64", "--quiet", "--json", "--out", str(run)])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    built: dict[str, nn.Module] = {}
    real_build = models.build_model

    def spy(spec: str, **kwargs):
        built[spec] = real_build(spec, **kwargs)
        return built[spec]

    monkeypatch.setattr(models, "build_model", spy)
    res = CliRunner().invoke(main, ["report", "--dense", "zoo:lenet5", "--pruned", f"saved:{run / 'model'}",
                                    "--subset", "64", "--batch", "1", "--repeats", "1", "--quiet",
                                    "--out", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    seed_everything(0, deterministic=False)  # l1_filters_30's seed
    expected = create_model("lenet5").state_dict()
    got = built["zoo:lenet5"].state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["metric"]["dense"] == m["dense"]["accuracy"]
