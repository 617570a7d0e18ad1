"""Argument checks at the entry points: bad input gets a named secateur error naming the argument, and the
model and files are left untouched."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import secateur as sc
from secateur._validate import check_model, check_name_patterns, check_ratio, check_round_to
from secateur.app.recipe import load_recipe
from secateur.errors import ConfigError, InvalidModelError, SerializationError
from secateur.scope import Scope
from secateur.zoo import create_model


def _meta_lenet() -> nn.Module:
    with torch.device("meta"):
        return create_model("lenet5")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_string_is_not_a_model():
    for call in (
        lambda: sc.Pruner("resnet", 0.5),
        lambda: Scope().resolve("resnet"),
        lambda: check_model("resnet"),
    ):
        with pytest.raises(InvalidModelError, match=r"model must be an nn\.Module, got the string 'resnet'"):
            call()
    with pytest.raises(TypeError):  # still a TypeError for code that caught the old one
        sc.Pruner("resnet", 0.5)
    with pytest.raises(InvalidModelError, match="got the class Linear"):
        check_model(nn.Linear, "model")


def test_a_model_on_the_meta_device_is_named(tmp_path):
    model = _meta_lenet()
    with pytest.raises(
        InvalidModelError, match=r"model has its parameter 'conv1\.weight' .* on the meta device"
    ):
        sc.Pruner(model, 0.5)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    with pytest.raises(InvalidModelError, match="meta device"):
        sc.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(InvalidModelError, match="got the string 'lenet5'"):
        sc.save("lenet5", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(InvalidModelError, match=r"net has its buffer 'b'"):
        m = nn.Module()
        m.register_buffer("b", torch.empty(3, device="meta"))
        check_model(m, "net")


def test_a_sparsity_given_as_a_string_is_named_and_the_model_untouched():
    model = create_model("lenet5")
    before = _state(model)
    with pytest.raises(
        ConfigError, match=r"schedule \(a one-shot sparsity\) must be a fraction.*the string '0\.5'"
    ):
        sc.Pruner(model, "0.5")
    with pytest.raises(ConfigError, match=r"schedule \(a one-shot sparsity\) must be a fraction in \[0, 1\)"):
        sc.Pruner(model, 1.0)
    with pytest.raises(ConfigError, match="criterion_kwargs must be a dict"):
        sc.Pruner(model, 0.5, criterion_kwargs=[1])
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert sc.Pruner(model, np.float64(0.5)).schedule.sparsity_at(0) == 0.5


@pytest.mark.parametrize("value", ["0.5", True, math.nan, -0.1, 1.0, None, [0.5]])
def test_check_ratio_refuses_and_names_the_argument(value):
    with pytest.raises(ConfigError, match=r"^ratio must be a fraction in \[0, 1\)"):
        check_ratio(value, "ratio")


def test_check_ratio_accepts_numbers():
    assert check_ratio(0, "ratio") == 0.0 and check_ratio(np.float32(0.25), "ratio") == 0.25
    assert check_ratio(1, "keep", allow_one=True) == 1.0
    with pytest.raises(ConfigError, match=r"write ratio=0\.5, a number"):
        check_ratio("0.5", "ratio")


@pytest.mark.parametrize("value", [0, -4, 2.0, "8", True, None])
def test_round_to_must_be_a_positive_int(value):
    with pytest.raises(ConfigError, match=r"^round_to must be an int >= 1"):
        check_round_to(value)


def test_round_to_accepts_positive_ints():
    assert check_round_to(8) == 8 and check_round_to(np.int64(4)) == 4


def test_invalid_regex_in_a_pattern_is_named():
    model = create_model("lenet5")
    with pytest.raises(
        ConfigError, match=r"scope exclude: pattern 're:\(conv' is not a valid regular expression"
    ):
        Scope(exclude=["re:(conv"]).resolve(model)
    with pytest.raises(ConfigError, match=r"protect: pattern 're:\[' is not a valid regular expression"):
        check_name_patterns(["fc*", "re:["])
    with pytest.raises(ConfigError, match=r"protect must be a list of patterns, got the string 'conv1'"):
        check_name_patterns("conv1")
    with pytest.raises(ConfigError, match="scope include must be a list of patterns"):
        Scope(include="conv1").resolve(model)
    assert check_name_patterns(["re:^fc\\d$", "conv*"]) == ("re:^fc\\d$", "conv*")


def test_scope_takes_regex_patterns_like_protect():
    model = create_model("lenet5")
    names = [t.path for t in Scope(include=["re:^conv\\d$"]).resolve(model)]
    assert names == ["conv1", "conv2"]
    names = [t.path for t in Scope(exclude=["re:^fc"]).resolve(model)]
    assert names == ["conv1", "conv2"]


def test_recipe_values_are_strict_and_patterns_compiled(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text('sparsity: "0.5"\n')
    with pytest.raises(ConfigError, match=r"bad\.yaml: sparsity: Input should be a valid number, got str"):
        load_recipe(bad)
    bad.write_text("sparsity: 0.5\nprotect: ['re:(conv']\n")
    with pytest.raises(
        ConfigError, match=r"bad\.yaml: protect: .*'re:\(conv' is not a valid regular expression"
    ):
        load_recipe(bad)
    bad.write_text("sparsity: 0.5\nround_to: 0\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: round_to: Input should be greater than or equal to 1"):
        load_recipe(bad)


def test_load_needs_a_path(tmp_path):
    with pytest.raises(ConfigError, match="directory must be a path"):
        sc.load(3)
    with pytest.raises(SerializationError, match="not a folder written by secateur.save"):
        sc.load(tmp_path / "absent")
