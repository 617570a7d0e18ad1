"""A tiny Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021).

Patch embedding by a strided conv, a learned class token and position embedding, pre-norm
transformer blocks (Vaswani et al. 2017; pre-norm as in the ViT paper), and a linear ``head`` on
the class token. Attention is written with explicit ``qkv``/``proj`` linears and
``F.scaled_dot_product_attention`` so that heads can be pruned by editing ``num_heads``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from secateur.errors import ConfigError
from secateur.zoo.registry import register_model

__all__ = ["Attention", "Block", "Mlp", "VisionTransformer", "vit_tiny"]


class Attention(nn.Module):
    """Multi-head self-attention: (N, T, dim) -> (N, T, dim).

    ``qkv`` maps dim -> 3 * num_heads * head_dim (laid out [q | k | v], each head-major) and
    ``proj`` maps num_heads * head_dim -> dim; the forward reads ``num_heads`` and ``head_dim``
    from the attributes, so they may shrink after head pruning.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ConfigError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        out = F.scaled_dot_product_attention(q, k, v)  # (n, heads, t, head_dim)
        out = out.transpose(1, 2).reshape(n, t, self.num_heads * self.head_dim)
        return self.proj(out)


class Mlp(nn.Module):
    """``fc1`` (dim -> hidden) - GELU - ``fc2`` (hidden -> dim), on (N, T, dim)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)); (N, T, dim) -> same."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """``patch_embed`` conv, ``cls_token``, ``pos_embed``, ``blocks``, final ``norm``, ``head``.

    Input (N, in_chans, img_size, img_size) -> logits (N, num_classes); the sequence has
    (img_size / patch_size)^2 + 1 tokens.

    Raises:
        ConfigError: ``img_size`` not divisible by ``patch_size``, ``dim`` not divisible by
            ``num_heads``, or a non-positive size.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 28,
        patch_size: int = 7,
        dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        for arg, value in (
            ("img_size", img_size),
            ("patch_size", patch_size),
            ("dim", dim),
            ("depth", depth),
            ("num_heads", num_heads),
        ):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"VisionTransformer: {arg} must be an int >= 1, got {value!r}")
        if img_size % patch_size != 0:
            raise ConfigError(
                f"VisionTransformer: img_size {img_size} is not divisible by patch_size {patch_size}"
            )
        num_patches = (img_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, patches, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


@register_model("vit_tiny")
def vit_tiny(
    num_classes: int = 10,
    in_chans: int = 1,
    patch_size: int = 7,
    dim: int = 64,
    depth: int = 4,
    num_heads: int = 4,
    mlp_ratio: float = 2.0,
) -> VisionTransformer:
    """ViT: dim 64, depth 4, 4 heads, MLP ratio 2, 7x7 patches (16 tokens + cls); about 0.14M params."""
    return VisionTransformer(
        num_classes=num_classes,
        in_chans=in_chans,
        patch_size=patch_size,
        dim=dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
    )
