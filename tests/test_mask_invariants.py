"""The invariants the typed masks code relies on, named when broken:

- a :class:`~secateur.masks.patterns.Pattern` holds ``nm`` exactly for kind ``"nm"`` and ``block`` exactly
  for kind ``"block"`` (what :func:`pattern_mask` dispatches on), so a hand-built inconsistent one is refused;
- :func:`secateur.masks.element.original` is the stored tensor behind a mask (the optimizer's), the tensor
  itself when unmasked, and a named ``ConfigError`` for a name the module does not have.
"""

import pytest
import torch
from torch import nn

from secateur.errors import ConfigError
from secateur.masks.element import attach_mask, masked_parameters, original, set_mask
from secateur.masks.patterns import Pattern, parse_pattern, pattern_mask


def test_a_pattern_holds_the_sizes_of_its_kind_and_nothing_else():
    for spec, text in [("2:4", "2:4"), ("block2x3", "block2x3"), ("row", "row"), ("layer", "layer")]:
        assert str(parse_pattern(spec)) == text
    for bad in [
        dict(kind="nm"),
        dict(kind="block"),
        dict(kind="row", nm=(2, 4)),
        dict(kind="nm", nm=(2, 4), block=(1, 1)),
    ]:
        with pytest.raises(ConfigError, match=r"Pattern: kind .* 'nm' takes nm=\(N, M\) alone"):
            Pattern(**bad)
    with pytest.raises(ConfigError, match=r"Pattern: unknown kind 'columns'"):
        Pattern("columns")
    scores = torch.arange(24.0).reshape(4, 6)
    keep = pattern_mask(scores, Pattern("block", block=(2, 3)), 0.5)  # 4 blocks: the 2 lowest go
    assert keep.tolist() == [[False] * 6] * 2 + [[True] * 6] * 2


def test_original_is_the_stored_tensor_behind_a_mask():
    lin = nn.Linear(4, 3)
    stored = lin.weight
    assert original(lin, "weight") is stored  # unmasked: the parameter itself
    attach_mask(lin)
    keep = torch.tensor([[True, False, True, False]] * 3)
    set_mask(lin, keep)
    assert original(lin, "weight") is stored  # parametrize keeps the same Parameter object
    assert torch.equal(original(lin, "weight") != 0, keep & (stored != 0))
    assert [(p, n) for p, _, n in masked_parameters(nn.Sequential(lin))] == [("0", "weight")]
    with pytest.raises(ConfigError, match=r"Linear has no parameter 'weights'"):
        original(lin, "weights")
