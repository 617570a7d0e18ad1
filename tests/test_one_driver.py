"""One structured driver: every structured entry point gives the same plan for the same inputs.

Every registered group criterion (``GROUP_CRITERIA.list()``; data-dependent ones get the same calibration
batches) goes through every structured entry point on a small model: ``prune_channels``, a one-shot
``ChannelPruner`` then ``finalize``, ``prune_heads`` (head groups of a tiny BERT) and, for the criteria it
accepts as instances, ``llm.prune_decoder`` (head groups of a tiny Llama), and a one-shot channel
recipe run through ``secateur prune`` on a saved resnet8 with Fashion-MNIST calibration batches. Where the
inputs are the same (criterion, sparsity, allocation, model, data) the outcome is the same: the same plan,
or the same error (a criterion that cannot score these groups, e.g. ``michel`` on a CNN without attention,
refuses alike everywhere). The previous ``prune_channels`` loop (per-group L1/L2/random scores,
``choose_units``, ``ensure_member_nonempty``) is kept here as a reference copy: the driver's uniform
selection equals it.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secateur as sc
from secateur.allocation.structured import choose_units, ensure_member_nonempty
from secateur.criteria.group import GROUP_CRITERIA, get_group_criterion
from secateur.criteria.group.norms import lp_scores
from secateur.errors import ConfigError, InvalidModelError
from secateur.graph import DependencyGraph
from secateur.pruners.channel import ChannelPruner
from secateur.zoo import create_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent / "graph"))
import hf_models  # noqa: E402

from _plans import assert_same_plans, one_shot_plan, outcome, removed_units  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CRITERIA = GROUP_CRITERIA.list()
CHANNEL_CRITERIA = {"random", "l1", "l2", "fpgm", "bn_scale", "taylor", "fisher"}
SPARSITY = 0.4


# ----------------------------------------------------------------------------------------------------
# channels: a CNN with BatchNorm and residual blocks
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cnn() -> tuple[nn.Module, torch.Tensor, list]:
    torch.manual_seed(0)
    model = create_model("resnet8").eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 28, 28, generator=g)
    data = [
        (torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)
    ]
    return model, x, data


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("criterion", CRITERIA)
def test_channel_entry_points_agree(cnn, criterion, allocation):
    model, x, data = cnn
    common = dict(criterion=criterion, allocation=allocation, data=data, loss_fn=F.cross_entropy, seed=0)
    via_function = outcome(lambda: sc.prune_channels(copy.deepcopy(model), x, SPARSITY, **common)[1])
    via_pruner = outcome(lambda: one_shot_plan(copy.deepcopy(model), x, SPARSITY, **common))
    assert_same_plans(prune_channels=via_function, ChannelPruner=via_pruner)
    if criterion == "michel":  # scores attention heads only: a CNN has none, and every entry point says so
        assert isinstance(via_function, tuple) and "head" in via_function[1]
    elif criterion in CHANNEL_CRITERIA:  # the channel criteria do prune here: the equality is not vacuous
        assert removed_units(via_function) > 0


@pytest.mark.parametrize("criterion", ["fisher", "taylor"])
def test_select_leaves_the_model_untouched_and_hooks_areremoved_units(cnn, criterion):
    """select() scores and allocates only: in train mode too (BatchNorm statistics move in a train-mode
    forward), weights, buffers, .grad fields and hooks are as before."""
    model, x, data = cnn
    m = copy.deepcopy(model).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    pruner = ChannelPruner(m, x, schedule=SPARSITY, criterion=criterion, data=data, allocation="global")
    if criterion == "fisher":
        assert any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())  # Fisher's hooks
    removed = pruner.select(SPARSITY)
    pruner.close()
    assert sum(rm.size for rm in removed.values()) > 0
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert all(p.grad is None for p in m.parameters()) and m.training
    assert not any(hasattr(mod, "parametrizations") for mod in m.modules())


def test_prune_channels_detaches_criterion_hooks_when_selection_fails(cnn):
    model, x, _ = cnn
    m = copy.deepcopy(model)
    with pytest.raises(ConfigError, match="fisher"):
        sc.prune_channels(m, x, SPARSITY, criterion="fisher")  # needs data: refused after attach
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())


# ----------------------------------------------------------------------------------------------------
# the previous prune_channels loop, kept as a reference copy
# ----------------------------------------------------------------------------------------------------
def _previous_selection(graph: DependencyGraph, model, sparsity, criterion, seed, round_to) -> dict:
    rng = np.random.default_rng(seed)
    removed, cache = {}, {}
    for gi, g in enumerate(graph.groups):
        if g.n_prunable == 0:
            continue
        if criterion == "random":
            scores = rng.random(g.n_units)
        else:
            scores = lp_scores(g, model, 1.0 if criterion == "l1" else 2.0, cache)
        rm = ensure_member_nonempty(g, choose_units(g, scores, sparsity, round_to), scores)
        if rm.size:
            removed[gi] = rm
    return removed


class _Concat(nn.Module):
    """Two branches concatenated (uneven parts, one also read by the head): a group with several members."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 10, 1)
        self.c = nn.Conv2d(16, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.fc = nn.Linear(18, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ya = torch.relu(self.a(x))
        z = torch.relu(self.bn(self.c(torch.cat([ya, self.b(x)], 1))))
        return self.fc(torch.cat([z.mean((2, 3)), ya.mean((2, 3))], 1))


def _bert():
    model, x = hf_models.bert()
    return model.eval(), {"input_ids": x["input_ids"]}


REFERENCE_MODELS = {
    "resnet8": lambda: (create_model("resnet8").eval(), torch.randn(2, 1, 28, 28)),
    "mobilenetv2": lambda: (create_model("mobilenetv2").eval(), torch.randn(2, 1, 28, 28)),
    "concat": lambda: (_Concat().eval(), torch.randn(2, 3, 6, 6)),
    "bert": _bert,
}


@pytest.mark.parametrize("name", sorted(REFERENCE_MODELS))
def test_uniform_selection_equals_the_previous_prune_channels_loop(name):
    torch.manual_seed(0)
    model, x = REFERENCE_MODELS[name]()
    graph = DependencyGraph.build(model, x)
    for criterion in ("l1", "l2", "random"):
        for sparsity in (0.3, 0.5):
            for round_to in (1, 4):
                for seed in (0, 7) if criterion == "random" else (0,):
                    pruner = ChannelPruner(
                        model, x, schedule=sparsity, criterion=criterion, allocation="uniform",
                        round_to=round_to, seed=seed, graph=graph,
                    )
                    got = {gi: rm for gi, rm in pruner.select(sparsity).items() if rm.size}
                    want = _previous_selection(graph, model, sparsity, criterion, seed, round_to)
                    assert got.keys() == want.keys(), (criterion, sparsity, round_to, seed)
                    assert all(np.array_equal(got[gi], want[gi]) for gi in want)
                    assert want, "nothing selected: the comparison would be empty"


# ----------------------------------------------------------------------------------------------------
# heads: prune_heads, prune_channels(granularity="head"), ChannelPruner(granularity="head")
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert() -> tuple[nn.Module, dict, list]:
    torch.manual_seed(0)
    model, x = _bert()
    g = torch.Generator().manual_seed(2)
    data = [
        ({"input_ids": torch.randint(0, 99, (4, 7), generator=g)}, torch.randint(0, 3, (4,), generator=g))
        for _ in range(2)
    ]
    return model, x, data


def _bert_loss(out, y):
    return F.cross_entropy(out.logits, y)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("criterion", CRITERIA)
def test_head_entry_points_agree(bert, criterion, allocation):
    model, x, data = bert
    common = dict(criterion=criterion, allocation=allocation, data=data, loss_fn=_bert_loss, seed=0)
    heads = outcome(lambda: sc.prune_heads(copy.deepcopy(model), x, SPARSITY, **common)[1])
    channels = outcome(
        lambda: sc.prune_channels(copy.deepcopy(model), x, SPARSITY, granularity="head", **common)[1]
    )
    pruner = outcome(lambda: one_shot_plan(copy.deepcopy(model), x, SPARSITY, granularity="head", **common))
    assert_same_plans(prune_heads=heads, prune_channels=channels, ChannelPruner=pruner)
    if criterion == "bn_scale":  # attention heads carry no norm scale γ: refused alike
        assert isinstance(heads, tuple) and "bn_scale" in heads[1]
    elif criterion in CHANNEL_CRITERIA | {"michel"}:
        assert removed_units(heads) > 0
        assert all(g["n_units"] == 4 for g in heads["groups"])  # only the 4-head groups lose units


# ----------------------------------------------------------------------------------------------------
# llm.prune_decoder: the data-free criteria, given as instances
# ----------------------------------------------------------------------------------------------------
DATA_FREE = [n for n in CRITERIA if not get_group_criterion(n).needs_data]


@pytest.mark.parametrize("criterion", DATA_FREE)
def test_prune_decoder_equals_prune_heads_for_data_free_criteria(criterion):
    from secateur.llm import prune_decoder

    torch.manual_seed(0)
    model, _ = hf_models.llama()
    model.eval()
    ids = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(3))
    calib = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    x = {**calib, "use_cache": False}  # the example inputs prune_decoder traces with
    via_decoder = outcome(
        lambda: prune_decoder(
            copy.deepcopy(model), calib, 0.5, layers=[0, 1], what=("heads",),
            criterion=get_group_criterion(criterion),
        )[1]
    )
    via_heads = outcome(
        lambda: sc.prune_heads(copy.deepcopy(model), x, 0.5, criterion=criterion, allocation="uniform")[1]
    )
    assert_same_plans(prune_decoder=via_decoder, prune_heads=via_heads)
    if criterion in CHANNEL_CRITERIA - {"bn_scale"}:
        assert removed_units(via_heads) == 4  # 2 of 4 key/value heads in each of 2 layers


# ----------------------------------------------------------------------------------------------------
# recipes through the CLI: `secateur prune --recipe` on a saved model equals prune_channels
# ----------------------------------------------------------------------------------------------------
CLI_SUBSET = 64  # Fashion-MNIST images per split: two calibration batches of 16, a 64-image test set


@pytest.fixture(scope="module")
def saved_cnn(tmp_path_factory) -> Path:
    """resnet8 (seed 0) saved with secateur.save: the CLI reads it as --model saved:FOLDER."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("one_driver_cli") / "resnet8"
    sc.save(create_model("resnet8"), folder)
    return folder


@pytest.fixture(scope="module")
def cli_data() -> tuple[list, torch.Tensor]:
    """The calibration batches and example inputs ``secateur prune --subset CLI_SUBSET`` gives a recipe of
    :func:`_channel_recipe` (its data fields do not depend on the criterion): app.run.load_data's training
    loader, first ``data_batches`` batches of epoch 0 (Recipe.data_from, as app.run.prune_with_recipe)."""
    from secateur.app.run import load_data

    recipe = _channel_recipe("l1")
    train, _, example = load_data("fashion-mnist", recipe, CLI_SUBSET)
    data = recipe.data_from(train)
    assert isinstance(data, list) and [len(y) for _, y in data] == [16, 16]
    return data, example


def _channel_recipe(criterion: str) -> sc.Recipe:
    """One-shot channel pruning at SPARSITY with ``criterion``, no fine-tuning, two calibration batches."""
    return sc.Recipe(
        name=f"one_driver_{criterion}",
        granularity="channel",
        criterion=criterion,
        sparsity=SPARSITY,
        schedule="one_shot",
        data_batches=2,
        finetune={"epochs": 0, "batch_size": 16, "recalibrate_bn": 0},
    )


@pytest.mark.parametrize("criterion", CRITERIA)
def test_a_recipe_through_the_cli_gives_the_plan_of_prune_channels(saved_cnn, cli_data, criterion, tmp_path):
    """The recipe (written to YAML) runs through ``secateur prune`` in-process; the plan.json it writes equals
    prune_channels' plan on the same weights, example inputs and calibration batches (those the CLI draws:
    app.run.load_data + Recipe.data_from), or both refuse with the same message."""
    from click.testing import CliRunner

    from secateur.app.cli import main

    recipe = _channel_recipe(criterion)
    (tmp_path / "recipe.yaml").write_text(recipe.to_yaml())
    out = tmp_path / "run"
    args = ["prune", "--model", f"saved:{saved_cnn}", "--recipe", str(tmp_path / "recipe.yaml"), "--quiet"]
    res = CliRunner().invoke(main, [*args, "--subset", str(CLI_SUBSET), "--out", str(out), "--json"])
    data, example = cli_data
    direct = outcome(
        lambda: sc.prune_channels(
            sc.load(saved_cnn), example, recipe.sparsity, criterion=criterion, allocation=recipe.allocation,
            target=recipe.target, round_to=recipe.round_to, data=data, seed=recipe.seed,
        )[1]
    )
    if isinstance(direct, tuple):  # refused (michel: no attention heads in a CNN): the CLI says the same
        assert res.exit_code == 1 and f"Error: {direct[1]}" in res.output, res.output
        assert not (out / "model").exists()
        return
    assert res.exit_code == 0, res.output
    cli_plan = json.loads((out / "model" / "plan.json").read_text())["plan"]
    assert_same_plans(cli=cli_plan, prune_channels=direct)
    if criterion in CHANNEL_CRITERIA:
        assert removed_units(direct) > 0


# ----------------------------------------------------------------------------------------------------
# entry checks
# ----------------------------------------------------------------------------------------------------
def test_entry_checks_name_the_argument_and_leave_the_model_untouched(cnn):
    model, x, _ = cnn
    m = copy.deepcopy(model)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ConfigError, match="sparsity.*write sparsity=0.5"):
        sc.prune_channels(m, x, sparsity="0.5")
    with pytest.raises(ConfigError, match="round_to"):
        sc.prune_channels(m, x, 0.5, round_to=0)
    with pytest.raises(ConfigError, match="protect must be a list"):
        sc.prune_channels(m, x, 0.5, protect="fc")
    with pytest.raises(ConfigError, match="granularity"):
        sc.prune_channels(m, x, 0.5, granularity="filter")
    with pytest.raises(InvalidModelError, match="model"):
        sc.prune_channels("resnet8", x, 0.5)
    with pytest.raises(ConfigError, match="sparsity"):
        sc.prune_heads(m, x, 1.0)
    graph = DependencyGraph.build(m, x)
    with pytest.raises(ConfigError, match="shape the graph when it is built"):
        sc.prune_channels(m, x, 0.5, graph=graph, untraced="freeze")
    with pytest.raises(ConfigError, match="another model"):
        sc.prune_channels(copy.deepcopy(m), x, 0.5, graph=graph)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_groups_restrict_the_driver_and_a_criterion_may_score_a_subset(cnn):
    """``groups=`` limits what the driver prunes; groups a criterion leaves unscored stay whole."""
    model, x, _ = cnn
    m = copy.deepcopy(model)
    graph = DependencyGraph.build(m, x)
    ids = [gi for gi, g in enumerate(graph.groups) if g.n_prunable]
    assert len(ids) >= 3
    pruner = ChannelPruner(
        m, x, schedule=0.5, criterion="l1", allocation="uniform", graph=graph, groups=ids[:2]
    )
    assert pruner.group_ids == ids[:2]
    assert {gi for gi, rm in pruner.select(0.5).items() if rm.size} == set(ids[:2])
    _, plan = sc.prune_channels(copy.deepcopy(m), x, 0.5, groups=lambda g: ids[:2], verify=False)
    assert {g["group"] for g in plan["groups"]} == {graph.groups[gi].name for gi in ids[:2]}

    class FirstOnly(type(get_group_criterion("l1"))):
        def scores(self, model, graph, group_ids):
            full = super().scores(model, graph, group_ids)
            return {gi: s if gi == ids[0] else None for gi, s in full.items()}

    pruner = ChannelPruner(m, x, schedule=0.5, criterion=FirstOnly(), allocation="uniform", graph=graph)
    assert {gi for gi, rm in pruner.select(0.5).items() if rm.size} == {ids[0]}
    with pytest.raises(ConfigError, match="not group indices"):
        ChannelPruner(m, x, schedule=0.5, graph=graph, groups=[len(graph.groups)])
