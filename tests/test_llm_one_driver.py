"""llm.prune_decoder is a call of the one structured driver (issue 13).

Every registered group criterion (``GROUP_CRITERIA.list()``, data-dependent ones fed the same calibration
text as causal-LM batches) gives ``prune_decoder`` the plan that the other structured entry points give for
the same inputs: for attention heads, ``prune_heads``, ``prune_channels(granularity="head")`` and a one-shot
``ChannelPruner(granularity="head")`` with uniform allocation; for FFN neurons, a one-shot ``ChannelPruner``
restricted by the decoder's group filter (:func:`secateur.llm.decoder_layer_groups`). A criterion that
cannot score these groups refuses alike everywhere (same error type and message).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch

import secateur as sc
from secateur.criteria.group import GROUP_CRITERIA
from secateur.llm import causal_lm_data, causal_lm_loss, decoder_layer_groups, prune_decoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent / "graph"))
import hf_models  # noqa: E402

from _plans import assert_same_plans, one_shot_plan, outcome, removed_units  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CRITERIA = GROUP_CRITERIA.list()
SPARSITY = 0.5
#: criteria that score every head and FFN group of a Llama layer, so the equality below is not vacuous
SCORING = {"random", "l1", "l2", "fpgm", "taylor", "fisher", "llm_pruner", "wanda_sp"}


@pytest.fixture(scope="module")
def llama() -> tuple[torch.nn.Module, dict, dict]:
    """A 2-layer Llama (8 query heads over 4 KV heads, FFN 64), calibration text with padding, and the
    example inputs prune_decoder traces with (its first two sequences)."""
    torch.manual_seed(0)
    model, _ = hf_models.llama()
    with torch.no_grad():  # HF init has a tiny std: larger weights make the scores distinct
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    ids = torch.randint(0, 99, (3, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[-1, -3:] = 0
    calib = {"input_ids": ids, "attention_mask": mask}
    x = {"input_ids": ids[:2], "attention_mask": mask[:2], "use_cache": False}
    return model.eval(), calib, x


@pytest.mark.parametrize("criterion", CRITERIA)
def test_prune_decoder_heads_equal_every_head_entry_point(llama, criterion):
    model, calib, x = llama
    common = dict(
        criterion=criterion,
        allocation="uniform",
        data=causal_lm_data(calib),
        loss_fn=causal_lm_loss,
        seed=0,
    )
    decoder = outcome(
        lambda: prune_decoder(
            copy.deepcopy(model), calib, SPARSITY, layers=[0, 1], what=("heads",), criterion=criterion, seed=0
        )[1]
    )
    heads = outcome(lambda: sc.prune_heads(copy.deepcopy(model), x, SPARSITY, **common)[1])
    channels = outcome(
        lambda: sc.prune_channels(copy.deepcopy(model), x, SPARSITY, granularity="head", **common)[1]
    )
    pruner = outcome(lambda: one_shot_plan(copy.deepcopy(model), x, SPARSITY, granularity="head", **common))
    assert_same_plans(prune_decoder=decoder, prune_heads=heads, prune_channels=channels, ChannelPruner=pruner)
    if criterion in SCORING | {"michel"}:
        assert removed_units(decoder) == 4  # 2 of 4 key/value heads in each of the 2 layers
    elif criterion == "bn_scale":  # a head has no norm scale: refused alike, by name
        assert isinstance(decoder, tuple) and "bn_scale" in decoder[1]


@pytest.mark.parametrize("criterion", CRITERIA)
def test_prune_decoder_mlp_equals_the_driver_with_the_decoder_group_filter(llama, criterion):
    model, calib, x = llama
    decoder = outcome(
        lambda: prune_decoder(
            copy.deepcopy(model), calib, SPARSITY, layers=[0, 1], what=("mlp",), criterion=criterion, seed=0
        )[1]
    )
    pruner = outcome(
        lambda: one_shot_plan(
            copy.deepcopy(model),
            x,
            SPARSITY,
            criterion=criterion,
            allocation="uniform",
            groups=decoder_layer_groups([0, 1], ("mlp",)),
            data=causal_lm_data(calib),
            loss_fn=causal_lm_loss,
            seed=0,
        )
    )
    assert_same_plans(prune_decoder=decoder, ChannelPruner=pruner)
    if criterion in SCORING:
        assert removed_units(decoder) == 64  # 32 of 64 FFN neurons in each of the 2 layers
    elif criterion == "michel":  # scores attention heads only: an FFN group is refused alike, by name
        assert isinstance(decoder, tuple) and "michel" in decoder[1]
