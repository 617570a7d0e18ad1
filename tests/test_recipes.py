"""One recipe object for Python and YAML, built into a pruner, and every shipped recipe run from the CLI.

- every shipped recipe round-trips Python -> YAML -> Python unchanged (object equality, YAML text stable);
- a recipe written in Python equals the shipped YAML one, field for field;
- ``Recipe.build`` gives the pruner the runner drives (element, N:M, channel), and refuses what it cannot
  build by name; ``secateur.llm.prune_linears`` (Wanda / SparseGPT at N:M on any model's Linears) keeps
  the top-N scores of every group and is a transaction;
- every shipped recipe runs through ``secateur prune`` on a small model it suits and a data subset, and
  the saved folder loads with the pruning in it;
- ``--trust-factory`` lets the CLI load a folder saved from a user factory (and nothing else does).
"""

import json
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import secateur as sc
from secateur.app.cli import main
from secateur.app.recipe import load_recipe, shipped_recipes
from secateur.errors import ConfigError, UntrustedCodeError
from secateur.pruners.channel import ChannelPruner
from secateur.pruners.element import Pruner
from secateur.pruners.recipe import NMAllocation, ScheduleSpec

# ---------------------------------------------------------------------------------------------- the object


@pytest.mark.parametrize("name", shipped_recipes())
def test_shipped_recipe_round_trips_python_yaml_python(name, tmp_path):
    r = load_recipe(name)
    assert isinstance(r, sc.Recipe) and r.name == name and r.description and r.suits
    text = r.to_yaml()
    again = sc.Recipe.from_yaml(text)
    assert again == r and again.to_yaml() == text  # equal objects, stable text on the second trip
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    assert sc.Recipe.from_yaml(path) == r == sc.Recipe.from_yaml(str(path))
    assert sc.Recipe(**json.loads(json.dumps(r.to_dict()))) == r  # Python kwargs from the same data


def test_a_recipe_written_in_python_is_the_shipped_yaml_recipe():
    taylor = sc.Recipe(
        name="taylor_channels_2x",
        description=load_recipe("taylor_channels_2x").description,
        suits=load_recipe("taylor_channels_2x").suits,
        granularity="channel",
        criterion="taylor",
        allocation="global",
        target="macs",
        sparsity=0.5,
        schedule={"kind": "iterative", "steps": 5, "start": 0.0, "end": 0.5},
        finetune={"epochs": 2, "lr": 0.02},
    )
    assert taylor == load_recipe("taylor_channels_2x")
    wanda = sc.Recipe(
        name="wanda_2_4",
        description=load_recipe("wanda_2_4").description,
        suits=load_recipe("wanda_2_4").suits,
        granularity="2:4",
        criterion="wanda",
        scope={"types": ["Linear"], "exclude_last": True},
        data_batches=8,
        finetune={"epochs": 0},
    )
    assert wanda == load_recipe("wanda_2_4")
    assert wanda.nm == (2, 4) and wanda.final_sparsity == 0.5 and wanda.allocation is None
    # A schedule may be given as its kind, a mapping or the spec object: the same recipe.
    a = sc.Recipe(sparsity=0.5, schedule="cubic")
    assert (
        a
        == sc.Recipe(sparsity=0.5, schedule={"kind": "cubic"})
        == sc.Recipe(sparsity=0.5, schedule=ScheduleSpec(kind="cubic"))
    )


def test_python_recipe_with_every_section_round_trips():
    r = sc.Recipe(
        criterion="taylor",
        allocation="erk",
        sparsity=0.75,
        schedule={"kind": "iterative", "steps": 3, "end": 0.4, "mode": "geometric"},
        scope={"types": ["Conv2d", "Linear"], "include": ["re:^layer"], "exclude_first": True},
        protect=("fc",),  # a tuple is read as a list
        criterion_kwargs={"num_batches": 2},
        data_batches=4,
        finetune={"epochs": 3, "optimizer": "adamw", "lr": 1e-3, "recalibrate_bn": 0},
        seed=7,
    )
    assert r.protect == ["fc"]
    again = sc.Recipe.from_yaml(r.to_yaml())
    assert again == r and again.to_yaml() == r.to_yaml()
    scope = r.to_scope()
    assert scope.types == (nn.Conv2d, nn.Linear) and tuple(scope.exclude) == ("fc",) and scope.exclude_first


def test_errors_are_named_from_python_and_yaml_alike():
    cases = [
        (dict(sparsity="0.5"), r"sparsity: Input should be a valid number, got str '0.5'"),
        (
            dict(sparsity=0.5, criterion="fgpm"),
            r"criterion: unknown criterion 'fgpm' \(did you mean 'fpgm'\?\)",
        ),
        (dict(sparsity=0.5, criterion="fpgm"), r"criterion 'fpgm' does not work at granularity 'element'"),
        (dict(granularity="channel", criterion="magnitude", sparsity=0.5), r"allowed there: \[.*'l1'"),
        (dict(granularity="2:4", criterion="wanda", allocation="global"), r"takes no allocation"),
        (dict(granularity="2:4", sparsity=0.3), r"removes 0.5 of the weights; sparsity 0.3 disagrees"),
        (dict(granularity="2:4", schedule="cubic"), r"schedule kind must be 'one_shot'"),
        (dict(granularity="4:4"), r"granularity: N:M needs 0 < N < M, got '4:4'"),
        (
            dict(granularity="channel", criterion="l1", sparsity=0.5, scope={"exclude": ["fc"]}),
            r"selects with 'protect'",
        ),
        (dict(criterion="magnitude"), r"granularity 'element' needs a sparsity"),
        (
            dict(sparsity=0.5, scope={"exclud": ["fc"]}),
            r"scope\.exclud: unknown key \(did you mean 'exclude'\?\)",
        ),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            sc.Recipe(**kwargs)
        with pytest.raises(ConfigError, match=pattern):
            sc.Recipe.from_yaml(json.dumps(kwargs))  # JSON is YAML: the same object from text
    # An unquoted 2:4 is a base-60 integer to YAML 1.1: named, with the fix.
    with pytest.raises(ConfigError, match=r'granularity: got the number 124: .*write it in quotes \("2:4"\)'):
        sc.Recipe.from_yaml("granularity: 2:4\ncriterion: wanda\n")
    assert sc.Recipe.from_yaml('granularity: "2:4"\ncriterion: wanda\n').nm == (2, 4)
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read it"):
        sc.Recipe.from_yaml("missing.yaml")


# ---------------------------------------------------------------------------------------------- build


def _batch(n=16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_build_element_recipe_is_the_pruner_a_loop_drives():
    from secateur.zoo import create_model

    model = create_model("lenet5")
    r = sc.Recipe(sparsity=0.8, schedule={"kind": "cubic", "end": 0.5, "updates": 4})
    pruner = r.build(model, total_steps=40)
    assert isinstance(pruner, Pruner) and pruner.schedule.update_steps[-1] <= 20
    for step in range(41):
        pruner.step(step)
    assert pruner.sparsity() == pytest.approx(0.8, abs=1e-3)
    model = pruner.finalize()
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.8, abs=1e-3)


def test_build_nm_recipe_keeps_the_top_n_of_every_m():
    from secateur.zoo import create_model

    model = create_model("vit_tiny")
    r = sc.Recipe(granularity="2:4", scope={"types": ["Linear"]})
    pruner = r.build(model)
    assert isinstance(pruner, Pruner) and isinstance(pruner.allocate, NMAllocation)
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    pruner.step(0)
    model = pruner.finalize()
    for name, w0 in dense.items():
        w = model.get_submodule(name).weight.detach()
        groups, kept = w0.abs().reshape(w0.shape[0], -1, 4), (w != 0).reshape(w0.shape[0], -1, 4)
        assert torch.equal(kept.sum(-1), torch.full_like(kept.sum(-1), 2)), name
        low_kept = groups.masked_fill(~kept, float("inf")).amin(-1)
        high_dropped = groups.masked_fill(kept, float("-inf")).amax(-1)
        assert bool((low_kept >= high_dropped).all()), name  # magnitude: the kept are the largest
        assert torch.equal(w[w != 0], w0[w != 0])


def test_build_channel_recipe_needs_example_inputs_and_compacts():
    from secateur.zoo import create_model

    r = load_recipe("l1_filters_30")
    model = create_model("resnet8")
    with pytest.raises(ConfigError, match="needs example_inputs"):
        r.build(model)
    model.train()
    pruner = r.build(model, torch.zeros(1, 1, 28, 28))
    assert isinstance(pruner, ChannelPruner) and model.training  # traced in eval mode, mode restored
    before = sc.count_params(model)["params"]
    pruner.step(0)
    small = pruner.finalize()
    assert sc.count_params(small)["params"] < 0.8 * before


def test_build_refuses_a_oneshot_calibration_method_by_name():
    from secateur.zoo import create_model

    with pytest.raises(ConfigError, match=r"secateur\.llm\.prune_linears\(model, data, method='wanda'"):
        load_recipe("wanda_2_4").build(create_model("vit_tiny"))


def _mlp() -> nn.Module:
    """The same small MLP every call (16 -> 32 -> 8): element, 2:4 and channel recipes all apply to it."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _plan(pruner) -> dict[str, list[int]]:
    """What one step of ``pruner`` removed: unit indices per group (channels) or flat weight indices per
    parameter (elements, N:M)."""
    pruner.step(0)
    if isinstance(pruner, ChannelPruner):
        return {k: sorted(v) for k, v in pruner.removed_units().items()}
    return {
        f"{path}.{pname}": (~sc.masks.get_mask(module, pname)).flatten().nonzero().flatten().tolist()
        for path, module, pname in sc.masks.masked_parameters(pruner.model)
    }


@pytest.mark.parametrize(
    "fields",
    [
        {"criterion": "random", "sparsity": 0.5},
        {"granularity": "2:4", "criterion": "random"},
        {"granularity": "channel", "criterion": "random", "sparsity": 0.5},
    ],
    ids=["element", "2:4", "channel"],
)
def test_the_recipe_seed_reaches_the_random_criterion(fields):
    def plan(recipe):
        return _plan(recipe.build(_mlp(), torch.zeros(1, 16)))

    def from_yaml(seed, **extra):
        return sc.Recipe.from_yaml(sc.Recipe(**fields, seed=seed, **extra).to_yaml())

    one = plan(sc.Recipe(**fields, seed=1))
    assert any(one.values())  # it removed something
    assert plan(sc.Recipe(**fields, seed=1)) == one == plan(from_yaml(1))  # same seed: same plan
    two = plan(sc.Recipe(**fields, seed=2))
    assert two != one and plan(from_yaml(2)) == two  # another seed: another plan, Python or YAML
    # A seed named in criterion_kwargs wins over the recipe's.
    assert plan(sc.Recipe(**fields, seed=1, criterion_kwargs={"seed": 2})) == two


# ---------------------------------------------------------------------------------------------- prune_linears


def _input_norms(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """||X_j||_2 of every Linear's input over the batch, in float64 (an independent forward with hooks)."""
    out, handles = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):

            def hook(_m, inp, _o, name=name):
                a = inp[0].detach().double().reshape(-1, inp[0].shape[-1])
                out[name] = (a * a).sum(0).sqrt()

            handles.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return out


def test_prune_linears_wanda_2_4_keeps_the_top_scores_of_every_group():
    from secateur.llm import prune_linears
    from secateur.zoo import create_model

    torch.manual_seed(0)
    model = create_model("vit_tiny")
    x, y = _batch(32)
    norms = _input_norms(model, x)
    dense = {
        n: m.weight.detach().double().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    scope = load_recipe("wanda_2_4").to_scope()
    report = prune_linears(
        model, [(x[:16], y[:16]), (x[16:], y[16:])], method="wanda", pattern=(2, 4), scope=scope
    )
    assert report.n_tokens == 32 and report.overall_sparsity == 0.5
    pruned = {r.name for r in report.layers}
    assert "head" not in pruned and len(pruned) == len(dense) - 1  # exclude_last keeps the classifier
    for name in pruned:
        kept = (model.get_submodule(name).weight != 0).reshape(dense[name].shape[0], -1, 4)
        score = (dense[name].abs() * norms[name]).reshape(kept.shape)
        assert torch.equal(kept.sum(-1), torch.full_like(kept.sum(-1), 2)), name
        low_kept = score.masked_fill(~kept, float("inf")).amin(-1)
        high_dropped = score.masked_fill(kept, float("-inf")).amax(-1)
        assert bool((low_kept >= high_dropped * (1 - 1e-9)).all()), name


def test_prune_linears_is_a_transaction_and_names_what_it_refuses(monkeypatch):
    from secateur.llm import oneshot, prune_linears
    from secateur.zoo import create_model

    model = create_model("vit_tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, _ = _batch(8)
    with pytest.raises(ConfigError, match=r"patch_embed \(Conv2d\).*restrict the scope's types to Linear"):
        prune_linears(model, x, method="wanda", pattern="2:4", scope=sc.Scope())
    with pytest.raises(ConfigError, match=r"calibration batch 0 is a str"):
        prune_linears(model, ["not a batch"], method="wanda", pattern="2:4")
    calls = {"n": 0}
    real = oneshot.prune_linear

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(oneshot, "prune_linear", failing)
    with pytest.raises(RuntimeError, match="injected"):
        prune_linears(model, x, method="sparsegpt", pattern="2:4")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_prune_linears_takes_keyword_data():
    from secateur.llm import prune_linears

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, features, scale=1.0):
            return self.fc2(torch.relu(self.fc1(features * scale)))

    torch.manual_seed(0)
    model = MLP()
    report = prune_linears(model, {"features": torch.randn(5, 8), "scale": 2.0}, method="wanda", sparsity=0.5)
    assert [r.name for r in report.layers] == ["fc1", "fc2"] and report.n_tokens == 5
    assert (model.fc1.weight == 0).sum(1).tolist() == [4] * 16  # row pattern: half of every row


# ---------------------------------------------------------------------------------------------- the CLI

#: The small model each shipped recipe runs on in the CLI test (a recipe shipped without one fails below).
CLI_MODELS = {
    "gmp90": "zoo:lenet5",
    "heads_ffn_20": "zoo:vit_tiny",
    "l1_filters_30": "zoo:resnet8",
    "taylor_channels_2x": "zoo:resnet8",
    "wanda_2_4": "zoo:vit_tiny",
}


def test_every_shipped_recipe_has_a_cli_model():
    assert sorted(CLI_MODELS) == shipped_recipes()


def _check_saved(name: str, metrics: dict, model: nn.Module) -> None:
    """What the saved model of each shipped recipe must show."""
    recipe = load_recipe(name)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if name == "gmp90":
        zeros = sum(int((m.weight == 0).sum()) for m in layers) / sum(m.weight.numel() for m in layers)
        assert metrics["sparsity"] == pytest.approx(0.9, abs=2e-3) and zeros == pytest.approx(0.9, abs=2e-3)
    elif name == "l1_filters_30":
        assert metrics["pruned"]["params"] < 0.75 * metrics["dense"]["params"] and metrics["macs_ratio"] > 1.3
    elif name == "heads_ffn_20":  # heads and FFN neurons removed, the embedding width kept
        assert metrics["pruned"]["params"] < 0.95 * metrics["dense"]["params"]
        assert model.head.in_features == sc.zoo.create_model("vit_tiny").head.in_features
    elif name == "taylor_channels_2x":
        assert metrics["macs_ratio"] > 1.6  # half the MACs, within the rounding of whole channels
    elif name == "wanda_2_4":
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        for lname, m in linears[:-1]:
            nz = (m.weight != 0).reshape(m.weight.shape[0], -1, 4).sum(-1)
            assert int(nz.max()) <= 2, lname  # 2:4 in every group of every pruned Linear
        assert bool((linears[-1][1].weight != 0).all())  # the classifier stays dense
        assert metrics["sparsity"] == 0.5
    assert sc.count_params(model)["params"] == metrics["pruned"]["params"]
    assert metrics["recipe"] == recipe.to_dict()


@pytest.mark.parametrize("name", sorted(CLI_MODELS))
def test_every_shipped_recipe_runs_through_secateur_prune(name, tmp_path):
    out = tmp_path / "run"
    argv = ["prune", "--model", CLI_MODELS[name], "--recipe", name, "--subset", "64", "--quiet", "--json"]
    res = CliRunner().invoke(main, [*argv, "--out", str(out)])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output)
    model = sc.load(out / "model")
    _check_saved(name, metrics, model)
    assert json.loads((out / "model" / "plan.json").read_text())["metadata"]["recipe"]["name"] == name


def test_recipes_command_lists_suits_and_prints_loadable_yaml():
    runner = CliRunner()
    res = runner.invoke(main, ["recipes"])
    assert res.exit_code == 0, res.output
    for name in shipped_recipes():
        r = load_recipe(name)
        assert f"{name}: {r.description}" in res.output and f"suits: {r.suits}" in res.output
    assert "transformers / linear layers" in res.output
    res = runner.invoke(main, ["recipes", "wanda_2_4"])
    assert res.exit_code == 0 and sc.Recipe.from_yaml(res.output) == load_recipe("wanda_2_4")
    res = runner.invoke(main, ["recipes", "nope"])
    assert res.exit_code != 0 and "neither a file nor a shipped recipe" in res.output


# ------------------------------------------------------------------------------------------ --trust-factory


def test_cli_loads_a_user_factory_folder_only_with_trust_factory(tmp_path, monkeypatch):
    (tmp_path / "my_factories.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def mlp(hidden=32):
                return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from secateur.app.models import build_model

    folder = tmp_path / "saved"
    sc.save(build_model("my_factories:mlp", hidden=16), folder)
    spec = f"saved:{folder}"
    runner = CliRunner()
    res = runner.invoke(main, ["measure", "--model", spec])
    assert res.exit_code != 0 and "my_factories:mlp" in res.output and "trust" in res.output
    res = runner.invoke(main, ["measure", "--model", spec, "--trust-factory", "my_factories:mlp"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["params"] == 784 * 16 + 16 + 16 * 10 + 10
    res = runner.invoke(main, ["measure", "--model", spec, "--trust-factory", "my_factories:other"])
    assert res.exit_code != 0 and "my_factories:mlp" in res.output
    res = runner.invoke(
        main, ["eval", "--model", spec, "--trust-factory", "my_factories:mlp", "--subset", "64"]
    )
    assert res.exit_code == 0 and 0.0 <= json.loads(res.output)["accuracy"] <= 1.0
    with pytest.raises(UntrustedCodeError):
        build_model(spec)
    with pytest.raises(ConfigError, match="trust_factory applies to saved:PATH folders only"):
        build_model("zoo:lenet5", trust_factory=["my_factories:mlp"])
    # prune accepts it too and the folder it writes records the same factory
    out = tmp_path / "p"
    res = runner.invoke(
        main,
        [
            "prune",
            "--model",
            spec,
            "--trust-factory",
            "my_factories:mlp",
            "--recipe",
            "gmp90",
            "--subset",
            "128",
            "--quiet",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert isinstance(sc.load(out / "model", trust_factory="my_factories:mlp"), nn.Sequential)
    assert Path(out / "metrics.json").exists()
