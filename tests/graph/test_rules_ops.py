"""Coupling rules of secateur.graph.rules_ops (issue 17): tile, Tensor.unfold, F.unfold / F.fold, linalg norms
(ConvNeXt-V2's GRN) and torch.fft (FNet).

Each small model is pruned through the structured driver (``prune_channels``, with secateur's oracle) and then
checked independently: the masked copy and the compacted model agree in float64 (assert_outputs_close). A dim
the op mixes is asserted frozen, with the reason naming the op.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from graph_helpers import assert_outputs_close
from torch import nn

from secateur.compact import mask_model
from secateur.graph import DependencyGraph
from secateur.pruners.oneshot import prune_channels


def _prune(model: nn.Module, x: torch.Tensor, sparsity: float = 0.5) -> tuple[nn.Module, dict]:
    """Prune ``sparsity`` of every group (random criterion, oracle on), then compare the masked copy with
    the compacted model in float64; returns (pruned model, plan)."""
    model.eval()
    torch.manual_seed(0)
    pruned, plan = prune_channels(copy.deepcopy(model), x, sparsity, criterion="random", verify=True)
    assert plan["groups"], "nothing was pruned"
    masked = mask_model(copy.deepcopy(model), plan)
    assert_outputs_close(masked, pruned, x)
    return pruned, plan


def _group(model: nn.Module, x: torch.Tensor, param: str, dim: int):
    g = DependencyGraph.build(model.eval(), x).group_of(param, dim)
    assert g is not None
    return g


def _assert_frozen(model: nn.Module, x: torch.Tensor, param: str, dim: int, reason: str) -> None:
    g = _group(model, x, param, dim)
    assert g.n_prunable == 0
    assert any(reason in r for r in g.reasons), g.reasons


# ------------------------------------------------------------------------------------------------------
# tile
# ------------------------------------------------------------------------------------------------------
class TiledPosEmbed(nn.Module):
    """SAM2-Hiera's position embedding: a (1, C, 3, 3) grid resized to the feature map plus a (1, C, 2, 2)
    window tiled over space, added to a conv's output."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.pos_embed = nn.Parameter(torch.randn(1, c, 3, 3))
        self.window = nn.Parameter(torch.randn(1, c, 2, 2))
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        pos = F.interpolate(self.pos_embed, size=h.shape[-2:], mode="bicubic")
        return self.head(h + pos + self.window.tile((h.shape[-2] // 2, h.shape[-1] // 2)))


class TiledChannels(nn.Module):
    """Features tiled along the channel dim: the next layer reads every channel twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tile(self.a(x), (2,)).relu())


def test_tile_over_space_passes_the_channels():
    m, x = TiledPosEmbed(), torch.randn(2, 3, 8, 8)
    graph = DependencyGraph.build(m.eval(), x)
    g = graph.group_of("stem.weight", 0)
    assert g.n_prunable == 6 and {"window", "pos_embed"} <= {mb.name for mb in g.members}
    for name, d in (("pos_embed", 2), ("pos_embed", 3), ("window", 2), ("window", 3)):  # grids: not units
        assert graph.group_of(name, d) is None or graph.group_of(name, d).n_prunable == 0
    pruned, _ = _prune(m, x)
    assert pruned.stem.out_channels == pruned.window.shape[1] == pruned.pos_embed.shape[1] == 3
    assert pruned.head.in_channels == 3 and pruned.pos_embed.shape[2:] == (3, 3)


def test_tile_over_channels_couples_each_copy():
    m, x = TiledChannels(), torch.randn(4, 5)
    assert _group(m, x, "a.weight", 0).n_units == 6
    pruned, _ = _prune(m, x)
    assert pruned.a.out_features == 3 and pruned.b.in_features == 6
    # column j and j + 3 of b read the same kept channel of a
    keep = [i for i in range(6) if any(torch.equal(pruned.a.weight[k], m.a.weight[i]) for k in range(3))]
    assert torch.equal(pruned.b.weight, m.b.weight[:, keep + [k + 6 for k in keep]])


# ------------------------------------------------------------------------------------------------------
# Tensor.unfold (sliding windows) and F.unfold / F.fold (im2col / col2im)
# ------------------------------------------------------------------------------------------------------
class HaloWindows(nn.Module):
    """HaloNet's key/value windows: ``Tensor.unfold`` twice over the (padded) spatial dims, split into heads,
    attention of each block's query over its window, folded back."""

    def __init__(self, c: int = 8, heads: int = 2, block: int = 2, halo: int = 1) -> None:
        super().__init__()
        self.q = nn.Conv2d(3, c, 1)
        self.kv = nn.Conv2d(3, 2 * c, 1)
        self.num_heads, self.dim_head, self.block, self.halo = heads, c // heads, block, halo
        self.proj = nn.Conv2d(c, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        nh, nw, bs, win = H // self.block, W // self.block, self.block, self.block + 2 * self.halo
        q = self.q(x).reshape(B * self.num_heads, self.dim_head, nh, bs, nw, bs).permute(0, 2, 4, 3, 5, 1)
        q = q.reshape(B * self.num_heads, nh * nw, bs * bs, self.dim_head)
        kv = F.pad(self.kv(x), [self.halo] * 4)
        kv = kv.unfold(2, win, bs).unfold(3, win, bs)  # (B, 2C, nh, nw, win, win)
        kv = kv.reshape(B * self.num_heads, 2 * self.dim_head, nh * nw, win * win).permute(0, 2, 3, 1)
        k, v = kv.chunk(2, dim=-1)
        attn = (q @ k.transpose(-1, -2)).softmax(dim=-1)  # (B*heads, blocks, bs*bs, win*win)
        out = (attn @ v).reshape(B, self.num_heads, nh, nw, bs, bs, self.dim_head)
        out = out.permute(0, 1, 6, 2, 4, 3, 5).reshape(B, self.num_heads * self.dim_head, H, W)
        return self.proj(out)


class WindowOverChannels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.scale = nn.Parameter(torch.randn(6))
        self.b = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b((self.a(x) * self.scale).unfold(-1, 3, 3))  # windows of 3 consecutive channels


def test_tensor_unfold_over_space_keeps_whole_heads():
    m, x = HaloWindows(), torch.randn(1, 3, 4, 4)
    g = _group(m, x, "kv.weight", 0)
    assert g.n_prunable == 2 and g.n_units == 2  # two heads (k and v of a head together)
    pruned, _ = _prune(m, x)
    assert pruned.num_heads == 1
    assert pruned.kv.out_channels == 8 and pruned.q.out_channels == pruned.proj.in_channels == 4


def test_tensor_unfold_over_a_channel_dim_is_frozen():
    _assert_frozen(WindowOverChannels(), torch.randn(2, 4), "a.weight", 0, "'unfold' slides windows")


class Im2colFold(nn.Module):
    """VOLO's outlook aggregation: F.unfold (im2col) of values, a weight per (position, kernel offset), F.fold
    (col2im) back; plus a linear whose C*k outputs are folded (each run of k outputs one channel)."""

    def __init__(self, c: int = 6, k: int = 3) -> None:
        super().__init__()
        self.k = k
        self.v = nn.Conv2d(3, c, 1)
        self.attn = nn.Conv2d(3, k * k, 1)
        self.lin = nn.Linear(3, c * k * k)
        self.proj = nn.Conv2d(c, 4, 1)
        self.proj2 = nn.Conv2d(c, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        v = self.v(x)
        C, kk = v.shape[1], self.k * self.k
        cols = F.unfold(v, self.k, padding=self.k // 2).reshape(B, C, kk, H * W)
        a = self.attn(x).softmax(dim=1).reshape(B, 1, kk, H * W)
        y = F.fold((cols * a).reshape(B, C * kk, H * W), (H, W), self.k, padding=self.k // 2)
        z = self.lin(x.flatten(2).transpose(1, 2)).transpose(1, 2)  # (B, C*kk, L)
        z = F.fold(z, (H, W), self.k, padding=self.k // 2)
        return self.proj(y) + self.proj2(z)


def test_im2col_and_fold_round_trip_prune_channels_and_merge_kernel_offsets():
    m, x = Im2colFold(), torch.randn(2, 3, 5, 5)
    assert _group(m, x, "v.weight", 0).n_prunable == 6
    g = _group(m, x, "lin.weight", 0)  # the 9 outputs that fold into one channel are one unit
    assert g.n_units == 6 and {mb.name for mb in g.members} >= {"lin.weight", "proj2.weight"}
    pruned, _ = _prune(m, x)
    assert pruned.v.out_channels == pruned.proj.in_channels == 3
    assert pruned.lin.out_features == 27 and pruned.proj2.in_channels == 3


# ------------------------------------------------------------------------------------------------------
# linalg norms: ConvNeXt-V2's global response normalisation
# ------------------------------------------------------------------------------------------------------
class GRNMlp(nn.Module):
    """Channels-last MLP with GRN (``vector_norm`` over space, divided by its mean over channels unless
    ``channel_mean=False``), or with a vector norm over the channel dim (``over_channels=True``)."""

    def __init__(self, channel_mean: bool = True, over_channels: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 8)
        self.gamma = nn.Parameter(torch.randn(8))
        self.fc2 = nn.Linear(8, 4)
        self.channel_mean, self.over_channels = channel_mean, over_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(x.permute(0, 2, 3, 1)))  # (B, H, W, 8)
        dim = -1 if self.over_channels else (1, 2)
        g = torch.linalg.vector_norm(h, ord=2, dim=dim, keepdim=True)
        if self.channel_mean:
            g = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        return self.fc2(h + self.gamma * (h * g))


def test_vector_norm_over_space_passes_the_channels():
    m, x = GRNMlp(channel_mean=False), torch.randn(2, 3, 4, 4)
    assert _group(m, x, "fc1.weight", 0).n_prunable == 8
    pruned, _ = _prune(m, x)
    assert pruned.fc1.out_features == pruned.gamma.shape[0] == pruned.fc2.in_features == 4


def test_grn_mean_over_channels_and_vector_norm_over_channels_are_frozen():
    x = torch.randn(2, 3, 4, 4)
    _assert_frozen(GRNMlp(), x, "fc1.weight", 0, "op 'mean'")
    m = GRNMlp(channel_mean=False, over_channels=True)
    _assert_frozen(m, x, "fc1.weight", 0, "'linalg_vector_norm' reduces over a channel dim")


# ------------------------------------------------------------------------------------------------------
# Fourier transforms: FNet's token mixing
# ------------------------------------------------------------------------------------------------------
class FourierMix(nn.Module):
    """``fft`` (``kind``: "seq" over the sequence dim, "hidden" over the channel dim, "fftn" FNet's 2-d
    transform over both, "rfft" a real transform over the sequence that changes its length)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)  # (B, L, 6)
        if self.kind == "seq":
            h = torch.fft.fft(h, dim=1).real
        elif self.kind == "hidden":
            h = torch.fft.fft(h).imag
        elif self.kind == "fftn":
            h = torch.fft.fftn(h, dim=(1, 2)).real
        else:
            h = torch.view_as_real(torch.fft.rfft(h, dim=1)).sum(-1)  # (B, L//2 + 1, 6)
        return self.b(h)


@pytest.mark.parametrize("kind", ["seq", "rfft"])
def test_fft_over_the_sequence_passes_the_channels(kind):
    m, x = FourierMix(kind), torch.randn(2, 5, 4)
    assert _group(m, x, "a.weight", 0).n_prunable == 6
    pruned, _ = _prune(m, x)
    assert pruned.a.out_features == pruned.b.in_features == 3


@pytest.mark.parametrize(("kind", "op"), [("hidden", "fft_fft"), ("fftn", "fft_fftn")])
def test_fft_over_the_channel_dim_is_frozen(kind, op):
    _assert_frozen(FourierMix(kind), torch.randn(2, 5, 4), "a.weight", 0, f"'{op}' mixes a channel dim")


def test_hf_fnet_hidden_size_is_frozen_by_its_fourier_transform():
    """FNet mixes tokens with ``fftn`` over (sequence, hidden): with ``prune_normalized=True`` the encoder's
    hidden size stays whole for that named reason, while the embedding width before FNet's projection and
    the MLP widths are prunable."""
    pytest.importorskip("transformers")
    from hf_models import HF_MODELS

    torch.manual_seed(0)
    model, x = HF_MODELS["fnet"]()
    g = DependencyGraph.build(model.eval(), x, prune_normalized=True)
    hidden = g.group_of("fnet.embeddings.projection.weight", 0)
    assert hidden.n_prunable == 0 and any("'fft_fftn' mixes a channel dim" in r for r in hidden.reasons)
    assert g.group_of("fnet.embeddings.word_embeddings.weight", 1).n_prunable == 32
    assert g.group_of("fnet.encoder.layer.0.intermediate.dense.weight", 0).n_prunable == 64
