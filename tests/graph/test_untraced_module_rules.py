"""Untraced-module detection and module rules: a module traced as one opaque op by a module rule
(``nn.MultiheadAttention``) reads its children's weights without calling them (``out_proj``); those children
count as reached. Found by the vision matrix: torchvision's ViT was refused with UntracedModuleError naming
every ``self_attention.out_proj``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import secateur as sc
from secateur.compact import check_equivalence, mask_model
from secateur.errors import UntracedModuleError
from secateur.graph import DependencyGraph


class AttnNet(nn.Module):
    """(B, 6, 8) tokens -> MLP (prunable hidden width 32) -> nn.MultiheadAttention -> head (B, 6, 5);
    ``aux`` (optional) runs only in train mode."""

    def __init__(self, aux: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 5)
        self.aux = nn.Linear(16, 3) if aux else None

    def forward(self, x: torch.Tensor):
        h = self.inp(x)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        h = self.attn(h, h, h, need_weights=False)[0]
        if self.training and self.aux is not None:
            return self.head(h), self.aux(h)
        return self.head(h)


def test_children_of_a_module_rule_count_as_reached_and_the_pruned_model_is_exact():
    torch.manual_seed(0)
    model = AttnNet().eval()
    x = torch.randn(2, 6, 8)
    graph = DependencyGraph.build(model, x)  # raised UntracedModuleError naming attn.out_proj before
    assert graph.group_of("attn.out_proj.weight", 0) is None  # inside the opaque op: never sliced
    g = graph.group_of("fc1.weight", 0)
    assert g is not None and g.n_prunable == 32
    reference = copy.deepcopy(model)
    pruned, plan = sc.prune_channels(model, x, 0.25, graph=graph)
    assert pruned.fc1.out_features == 24 and pruned.attn.out_proj.weight.shape == (16, 16)
    check_equivalence(mask_model(reference, plan), pruned, x)


def test_a_training_only_module_beside_a_module_rule_is_still_named():
    model = AttnNet(aux=True).eval()
    with pytest.raises(UntracedModuleError, match=r"^1 module\(s\).*'aux' \(Linear\)") as ei:
        DependencyGraph.build(model, torch.randn(2, 6, 8))
    assert "out_proj" not in str(ei.value)
