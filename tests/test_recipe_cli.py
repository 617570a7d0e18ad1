import difflib
import json
import shlex

import pytest
from click.testing import CliRunner

from secateur.app.cli import main
from secateur.app.recipe import load_recipe
from secateur.errors import ConfigError, did_you_mean
from secateur.pruners.recipe import Recipe
from secateur.schedules import Cubic, Iterative, OneShot

recipe_from_dict = Recipe.from_dict


def test_schedule_fractions_become_steps():
    r = load_recipe("gmp90")
    s = r.schedule.build(1000, r.sparsity)
    assert isinstance(s, Cubic) and s.start == 0 and s.end <= 600 and s.final_sparsity == 0.9
    assert s.sparsity_at(s.end) == pytest.approx(0.9)
    r = load_recipe("taylor_channels_2x")
    it = r.schedule.build(1000, r.sparsity)
    assert isinstance(it, Iterative) and it.update_steps == [0, 125, 250, 375, 500]
    r = load_recipe("l1_filters_30")
    assert isinstance(r.schedule.build(10, r.sparsity), OneShot)


def test_unknown_key_and_bad_values_are_named():
    with pytest.raises(ConfigError, match=r"sparsity: Input should be less than 1"):
        recipe_from_dict({"sparsity": 1.5})
    with pytest.raises(ConfigError, match=r"shedule: unknown key"):
        recipe_from_dict({"sparsity": 0.5, "shedule": {}})
    with pytest.raises(
        ConfigError, match=r"granularity: expected 'element', 'channel' or an N:M pattern .*, got 'filter'"
    ):
        recipe_from_dict({"sparsity": 0.5, "granularity": "filter"})
    with pytest.raises(
        ConfigError, match=r"criterion: .*unknown criterion 'magnitud'.*; allowed: \[.*'magnitude'"
    ):
        recipe_from_dict({"sparsity": 0.5, "criterion": "magnitud"})
    with pytest.raises(ConfigError, match=r"target 'macs' needs granularity 'channel'"):
        recipe_from_dict({"sparsity": 0.5, "target": "macs"})
    with pytest.raises(ConfigError, match="neither a file nor a shipped recipe"):
        load_recipe("no_such_recipe")


def _closest(word: str, choices) -> str:
    """The choice most similar to ``word`` (difflib ratio, case-insensitive), computed independently."""
    return max(choices, key=lambda c: difflib.SequenceMatcher(None, word.lower(), c.lower()).ratio())


def test_misspelt_keys_get_did_you_mean_at_every_level(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text(
        "critrion: magnitude\n"
        "sparsity: 0.5\n"
        "schedule: {kidn: cubic}\n"
        "scope: {exclud: [fc]}\n"
        "finetune: {optimiser: sgd}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_recipe(p)
    msg = str(info.value)
    assert "typo.yaml" in msg
    assert "critrion: unknown key (did you mean 'criterion'?)" in msg
    assert "schedule.kidn: unknown key (did you mean 'kind'?)" in msg
    assert "scope.exclud: unknown key (did you mean 'exclude'?)" in msg
    assert "finetune.optimiser: unknown key (did you mean 'optimizer'?)" in msg
    # The allowed keys of the level at fault are listed, and a key placed at the wrong level
    # is pointed to the section that has it.
    assert str(list(Recipe.model_fields["schedule"].annotation.model_fields)) in msg
    with pytest.raises(ConfigError, match=r"updates: unknown key \('updates' is a key of 'schedule'\)"):
        recipe_from_dict({"sparsity": 0.5, "updates": 5})
    top = r"schedule\.sparsity: unknown key \('sparsity' is a key of '\(top level\)'\)"
    with pytest.raises(ConfigError, match=top):
        recipe_from_dict({"schedule": {"kind": "cubic", "sparsity": 0.5}})
    # Through the CLI the same message reaches the user.
    res = CliRunner().invoke(main, ["prune", "--model", "zoo:lenet5", "--recipe", str(p), "--data", "none"])
    assert res.exit_code != 0 and "did you mean 'criterion'" in res.output


def test_bad_choice_values_suggest_the_closest_registered_name():
    from secateur.allocation.element import ALLOCATIONS
    from secateur.criteria import available_criteria
    from secateur.criteria.group import available_group_criteria

    for typo in ("magnitud", "fgpm", "tayler", "wandda"):
        with pytest.raises(ConfigError) as info:
            recipe_from_dict({"sparsity": 0.5, "criterion": typo})
        allowed = set(available_criteria()) | set(available_group_criteria()) | {"wanda", "sparsegpt"}
        assert f"did you mean {_closest(typo, allowed)!r}" in str(info.value)
    with pytest.raises(ConfigError) as info:
        recipe_from_dict({"sparsity": 0.5, "allocation": "globl"})
    assert f"did you mean {_closest('globl', set(ALLOCATIONS.list()) | {'uniform'})!r}" in str(info.value)
    # Literal choices at nested levels (schedule kind, scope types inside a list, optimizer).
    cases = [
        ({"granularity": "chanel"}, "granularity", "channel"),
        ({"schedule": {"kind": "iterativ"}}, "schedule.kind", "iterative"),
        ({"schedule": "cubc"}, "schedule.kind", "cubic"),
        ({"scope": {"types": ["Linear", "conv2d"]}}, "scope.types.1", "Conv2d"),
        ({"finetune": {"lr_schedule": "cosin"}}, "finetune.lr_schedule", "cosine"),
    ]
    for extra, field, want in cases:
        data = {"sparsity": 0.5, **extra}
        with pytest.raises(ConfigError, match=rf"{field}: .*\(did you mean '{want}'\?\)"):
            recipe_from_dict(data)
    # Nothing close: no suggestion, just the allowed values.
    with pytest.raises(ConfigError) as info:
        recipe_from_dict({"sparsity": 0.5, "criterion": "zzzzzz"})
    assert "did you mean" not in str(info.value) and "allowed" in str(info.value)


def test_did_you_mean_helper():
    assert did_you_mean("critrion", ["criterion", "description"]) == " (did you mean 'criterion'?)"
    assert did_you_mean("LINEAR", ["Linear", "Conv2d"]) == " (did you mean 'Linear'?)"
    assert did_you_mean("xyz", ["criterion"]) == ""
    assert did_you_mean(3, ["criterion"]) == ""


def test_bad_yaml_names_the_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("schedule: {kind: cubic\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: not valid YAML"):
        load_recipe(p)


def test_cli_prune_element_then_eval_saved_model(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "criterion: magnitude\nallocation: global\nsparsity: 0.8\n"
        "schedule: {kind: cubic, start: 0.0, end: 0.5, updates: 4}\n"
        "finetune: {epochs: 1, lr: 0.05, batch_size: 64}\n"
    )
    runner = CliRunner()
    out = tmp_path / "run"
    res = runner.invoke(
        main,
        [
            "prune",
            "--model",
            "zoo:lenet5",
            "--recipe",
            str(recipe),
            "--subset",
            "256",
            "--quiet",
            "--json",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    m = json.loads(res.output)
    assert m["sparsity"] == pytest.approx(0.8, abs=0.002)
    assert m["pruned"]["nonzero_params"] < 0.3 * m["dense"]["nonzero_params"]
    assert (out / "model" / "plan.json").exists() and (out / "metrics.json").exists()
    res = runner.invoke(main, ["eval", "--model", f"saved:{out / 'model'}", "--subset", "200"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["accuracy"] == pytest.approx(m["pruned"]["accuracy"], abs=0.2)


def test_cli_errors_are_clear(tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["prune", "--model", "zoo:nope", "--recipe", "gmp90", "--subset", "64"])
    assert res.exit_code != 0 and "nope" in res.output
    res = runner.invoke(main, ["prune", "--model", "zoo:lenet5", "--recipe", "nope.yaml"])
    assert res.exit_code != 0 and "nope.yaml" in res.output
    res = runner.invoke(main, ["measure", "--model", "zoo:lenet5"])
    assert res.exit_code == 0 and json.loads(res.output)["macs"] > 0
    for cmd in ("prune", "measure", "eval", "demo", "recipes"):
        assert runner.invoke(main, [cmd, "--help"]).exit_code == 0


def test_cli_finetune_prune_report_chain(tmp_path):
    runner = CliRunner()
    res = runner.invoke(
        main,
        [
            "finetune",
            "--model",
            "zoo:lenet5",
            "--subset",
            "256",
            "--epochs",
            "1",
            "--quiet",
            "--out",
            str(tmp_path / "ft"),
        ],
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        main,
        [
            "prune",
            "--model",
            f"saved:{tmp_path / 'ft' / 'model'}",
            "--recipe",
            "l1_filters_30",
            "--subset",
            "256",
            "--quiet",
            "--out",
            str(tmp_path / "p"),
        ],
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        main,
        [
            "report",
            "--dense",
            f"saved:{tmp_path / 'ft' / 'model'}",
            "--pruned",
            f"saved:{tmp_path / 'p' / 'model'}",
            "--subset",
            "200",
            "--batch",
            "4",
            "--repeats",
            "3",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert res.exit_code == 0, res.output
    html = (tmp_path / "r" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["pruned"]["macs"] < report["dense"]["macs"]
    # The "Reproduce" command is the one that was run: same options and values.
    argv = shlex.split(report["command"])
    assert argv[:2] == ["secateur", "report"]
    opts = dict(zip(argv[2::2], argv[3::2]))
    assert opts == {
        "--dense": f"saved:{tmp_path / 'ft' / 'model'}", "--pruned": f"saved:{tmp_path / 'p' / 'model'}",
        "--data": "fashion-mnist", "--batch": "4", "--out": str(tmp_path / "r"), "--subset": "200",
        "--repeats": "3",
    }
    assert "first 200 Fashion-MNIST test images" in report["description"]


def test_python_api_names_get_did_you_mean_too():
    """The same suggestions outside recipes: criteria, group criteria, allocations, zoo names, model specs."""
    from secateur.allocation.element import get_allocation
    from secateur.app.models import build_model
    from secateur.criteria.element.base import get_criterion
    from secateur.criteria.group import get_group_criterion
    from secateur.errors import ConfigError
    from secateur.zoo import create_model

    cases = [
        (lambda: get_criterion("magnitde", {}), "did you mean 'magnitude'"),
        (lambda: get_group_criterion("fpmg"), "did you mean 'fpgm'"),
        (lambda: get_allocation("globl"), "did you mean 'global'"),
        (lambda: create_model("resnt20"), "did you mean 'resnet20'"),
        (lambda: build_model("resnet20"), "did you mean 'zoo:resnet20'"),
    ]
    for call, hint in cases:
        with pytest.raises(ConfigError, match=hint):
            call()


def test_recipe_runner_recalibrates_batchnorm_after_pruning():
    """finetune.recalibrate_bn: after a one-shot prune the running statistics are the cumulative average of
    the pruned model's own BatchNorm inputs over the first k training batches (adaptive BN); 0 keeps them."""
    import torch
    from torch import nn

    from secateur.app.run import prune_with_recipe
    from secateur.data.loader import TensorLoader

    def net():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4, 3),
        )

    x, y = torch.randn(24, 1, 6, 6), torch.randint(0, 3, (24,))
    spec = {"criterion": "magnitude", "sparsity": 0.5, "schedule": "one_shot"}
    for k in (2, 0):
        model = net()
        before = model[1].running_mean.clone()
        loader = TensorLoader(x, y, batch_size=8, shuffle=False)
        recipe = recipe_from_dict({**spec, "finetune": {"epochs": 0, "recalibrate_bn": k}})
        out = prune_with_recipe(model, recipe, train_loader=loader)
        assert out["bn_batches"] == k
        if k == 0:
            assert torch.equal(model[1].running_mean, before)
            continue
        with torch.no_grad():  # BatchNorm's input on the first k batches, through the pruned conv
            means = [model[0](x[i * 8 : (i + 1) * 8]).mean(dim=(0, 2, 3)) for i in range(k)]
        assert torch.allclose(model[1].running_mean, torch.stack(means).mean(0), atol=1e-6)


def test_latency_is_a_recipe_target_for_channel_pruning_only():
    spec = {"granularity": "channel", "criterion": "l1", "target": "latency", "sparsity": 0.5}
    r = recipe_from_dict(spec)
    assert r.target == "latency"
    with pytest.raises(ConfigError, match="target 'latency' needs granularity 'channel'"):
        recipe_from_dict({"criterion": "magnitude", "target": "latency", "sparsity": 0.5})
