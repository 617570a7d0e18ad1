import math

import pytest
import torch

from secateur.errors import ConfigError
from secateur.masks.patterns import (
    block_mask,
    check_nm_mask,
    layer_mask,
    nm_mask,
    parse_pattern,
    pattern_mask,
    row_mask,
)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4), (7, 8)])
def test_nm_every_group_exact_and_keeps_the_largest(n, m):
    s = torch.randn(16, 32)
    keep = nm_mask(s, n, m)
    assert keep.dtype == torch.bool and keep.shape == s.shape
    groups_k = keep.reshape(16, -1, m)
    groups_s = s.reshape(16, -1, m)
    assert (groups_k.sum(-1) == n).all()
    assert check_nm_mask(keep, n, m)
    # Every kept score is >= every pruned score inside its own group.
    kept_min = torch.where(groups_k, groups_s, torch.full_like(groups_s, math.inf)).min(-1).values
    pruned_max = torch.where(~groups_k, groups_s, torch.full_like(groups_s, -math.inf)).max(-1).values
    assert (kept_min >= pruned_max).all()


def test_nm_ties_are_exact():
    keep = nm_mask(torch.zeros(3, 8), 2, 4)
    assert check_nm_mask(keep, 2, 4)
    assert keep[0].tolist() == [True, True, False, False] * 2  # earlier position wins a tie


def test_nm_conv_reads_out_by_in_kh_kw():
    s = torch.randn(4, 3, 2, 2)  # in*kh*kw = 12
    keep = nm_mask(s, 2, 4)
    assert keep.shape == s.shape
    assert check_nm_mask(keep.reshape(4, 12), 2, 4)
    ref = nm_mask(s.reshape(4, 12), 2, 4).reshape(s.shape)
    assert torch.equal(keep, ref)


def test_nm_errors_name_the_layer():
    with pytest.raises(ConfigError, match=r"enc\.fc.*not divisible by M=4"):
        nm_mask(torch.randn(4, 10), 2, 4, layer="enc.fc")
    with pytest.raises(ConfigError, match="fc2.*5:4"):
        nm_mask(torch.randn(4, 8), 5, 4, layer="fc2")
    with pytest.raises(ConfigError):
        nm_mask(torch.randn(8), 2, 4)


@pytest.mark.parametrize(
    "spec,why",
    [
        ("0:4", "N=0 would remove every weight"),
        ("4:4", "N=M keeps every weight"),
        ((0, 8), "N=0 would remove every weight"),
        ((8, 8), "N=M keeps every weight"),
        ("5:4", "need 0 < N < M"),
        ("1:0", "need 0 < N < M"),
        ((2.0, 4), "N of N:M must be an int"),
    ],
)
def test_nm_refuses_patterns_that_prune_everything_or_nothing(spec, why):
    """0:M zeroes every weight (a sparsity of 1.0, refused elsewhere too) and M:M is a silent no-op."""
    with pytest.raises(ConfigError, match=why):
        parse_pattern(spec)
    s = torch.randn(4, 8)
    with pytest.raises(ConfigError, match=f"^fc: .*{why}"):
        pattern_mask(s, spec, layer="fc")


@pytest.mark.parametrize("sp", [0.0, 0.3, 0.5, 0.9])
def test_row_mask_per_row_count(sp):
    s = torch.randn(7, 33)
    keep = row_mask(s, sp)
    assert ((~keep).sum(1) == math.floor(sp * 33)).all()


def test_layer_mask_count_and_threshold():
    s = torch.randn(10, 20)
    keep = layer_mask(s, 0.25)
    assert (~keep).sum().item() == 50
    assert s[keep].min() >= s[~keep].max()


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_block_mask_blocks_are_uniform_and_counted(reduce):
    s = torch.rand(8, 12)
    keep = block_mask(s, (2, 3), 0.5, reduce=reduce)
    b = keep.reshape(4, 2, 4, 3)
    per_block = b.sum(dim=(1, 3))
    assert ((per_block == 0) | (per_block == 6)).all()  # all-or-nothing
    assert (per_block == 0).sum().item() == math.floor(0.5 * 16)
    # The removed blocks are those of lowest total score.
    bs = s.reshape(4, 2, 4, 3).sum(dim=(1, 3))
    assert bs[per_block == 6].min() >= bs[per_block == 0].max()


def test_block_mask_errors():
    with pytest.raises(ConfigError, match="attn.q.*not divisible by block 4x4"):
        block_mask(torch.randn(8, 10), (4, 4), 0.5, layer="attn.q")
    with pytest.raises(ConfigError, match="sparsity"):
        block_mask(torch.randn(8, 8), (2, 2), 1.0)
    with pytest.raises(ConfigError, match="reduce"):
        block_mask(torch.randn(8, 8), (2, 2), 0.5, reduce="max")


def test_parse_and_dispatch():
    assert parse_pattern("2:4").nm == (2, 4)
    assert parse_pattern((4, 8)).fixed_sparsity == 0.5
    assert parse_pattern("block4x2").block == (4, 2)
    assert parse_pattern("unstructured").kind == "row"
    with pytest.raises(ConfigError):
        parse_pattern("3:2")
    with pytest.raises(ConfigError):
        parse_pattern("diagonal")
    s = torch.randn(4, 8)
    assert torch.equal(pattern_mask(s, "2:4"), nm_mask(s, 2, 4))
    assert torch.equal(pattern_mask(s, "row", 0.5), row_mask(s, 0.5))
    with pytest.raises(ConfigError, match="needs a sparsity"):
        pattern_mask(s, "row")


def test_inputs_not_modified():
    s = torch.randn(4, 8)
    c = s.clone()
    nm_mask(s, 2, 4)
    block_mask(s, (2, 2), 0.5)
    row_mask(s, 0.5)
    assert torch.equal(s, c)
