"""Named errors at the tracer's entry: a string or a meta-device model, and out-of-vocabulary token ids
(raw IndexError inside torch on a real trace, no error at all on a meta trace until the oracle ran)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateur.errors import ConfigError, InvalidModelError
from secateur.graph import DependencyGraph, ExampleInputs
from secateur.pruners.oneshot import prune_channels


class TinyLM(nn.Module):
    """GPT-2-like: the ids are reshaped (a view) before the embedding, and a position table follows."""

    def __init__(self, vocab: int = 11, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(16, d)
        self.fc = nn.Linear(d, 12)
        self.out = nn.Linear(12, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.view(-1, input_ids.shape[-1])
        h = self.embed(ids) + self.pos(torch.arange(ids.shape[-1]))
        return self.out(torch.relu(self.fc(h)))


@pytest.mark.parametrize("device", ["auto", "meta", "real"])
@pytest.mark.parametrize("bad", [11, 400, -1])
def test_out_of_vocabulary_ids_name_the_input_and_the_embedding(device, bad):
    ids = torch.randint(0, 11, (2, 5))
    ids[1, 3] = bad
    with pytest.raises(ConfigError) as info:
        DependencyGraph.build(TinyLM(), {"input_ids": ids}, device=device)
    msg = str(info.value)
    assert f"example_inputs['input_ids'] holds index {bad}, outside [0, 11)" in msg
    assert "op 'embedding' in module 'embed' (Embedding)" in msg


def test_out_of_vocabulary_ids_in_one_of_several_inputs_are_named_by_position():
    good = torch.arange(10).view(2, 5)  # ids 0..9
    with pytest.raises(ConfigError, match=r"example_inputs\[1\]\[0\] holds index 99"):
        DependencyGraph.build(TinyLM(), ExampleInputs([(good,), (good + 90,)]))
    DependencyGraph.build(TinyLM(), ExampleInputs([(good,), (good.flip(1),)]))  # in range: traced


def test_in_vocabulary_ids_trace_and_prune():
    model = TinyLM().eval()
    ids = torch.randint(0, 11, (2, 5))
    pruned, _ = prune_channels(model, ids, sparsity=0.5)
    assert pruned.fc.out_features == 6


def test_a_string_is_not_a_model():
    with pytest.raises(InvalidModelError, match="model must be an nn.Module, got the string 'resnet18'"):
        DependencyGraph.build("resnet18", torch.zeros(1, 3, 8, 8))
    with pytest.raises(InvalidModelError):  # also a TypeError, which generic code may catch
        prune_channels("resnet18", torch.zeros(1, 3, 8, 8))


def test_a_model_on_the_meta_device_is_refused_naming_the_parameter():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    named = r"parameter '0\.weight' \(shape \(4, 3\)\) on the meta device"
    with pytest.raises(InvalidModelError, match=named):
        DependencyGraph.build(model, torch.zeros(1, 3))
