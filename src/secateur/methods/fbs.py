"""Feature boosting and suppression (Gao et al. 2019, "Dynamic Channel Pruning: Feature Boosting and
Suppression", ICLR, sec. 3.2-3.4).

Each gated convolution gets a small saliency predictor from its *input*:
``s = ReLU(W_s · pool(x) + b_s)`` with ``pool`` the global average over space, shape ``(N, C_out)``
(sec. 3.3, eq. 6; the subsampling is the spatial mean here). A per-sample k-winners-take-all keeps
the ``k = ⌈d · C_out⌉`` largest saliencies (``d`` the density) and zeroes the rest:
``π = wta_k(s)`` (eq. 5). The layer output is ``π ⊙ norm(conv(x))`` (eq. 7): the kept channels are
*boosted* by their saliency, the others *suppressed* to exact zeros, so their computation can be
skipped at inference, and so can the next layer's matching input channels.

Training adds the L1 saliency loss ``λ Σ_layers mean_n ||s||_1`` (sec. 3.4) to the task loss.
:class:`FBSConv` has two numerically equal inference paths: ``"masked"`` (dense conv, then the
gate) and ``"skip"``, which per sample computes only the kept output channels from the non-zero
input channels; :meth:`FBS.macs_per_sample` reports what the skip path costs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from secateur.errors import ConfigError

__all__ = ["FBS", "FBSConv", "wta_mask"]


def wta_mask(s: torch.Tensor, k: int) -> torch.Tensor:
    """k-winners-take-all mask ``(N, C)`` bool: exactly ``k`` True per row, at the largest ``s``
    (ties broken by channel index, lower first)."""
    keep = torch.zeros_like(s, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(s.detach(), dim=1, descending=True, stable=True).indices[:, :k]
        keep.scatter_(1, idx, True)
    return keep


class FBSConv(nn.Module):
    """A ``Conv2d`` (and its following ``BatchNorm2d``) gated per sample by FBS.

    Input ``(N, C_in, H, W)`` -> output ``(N, C_out, H', W')`` with exactly ``C_out - ⌈d·C_out⌉``
    channels zero for every sample. ``mode``: ``"masked"`` (default) or ``"skip"`` (inference only,
    BatchNorm read in eval form). After each forward, ``saliency`` ``(N, C_out)`` holds ``s`` and
    ``gate`` the bool k-WTA mask; in skip mode ``macs`` ``(N,)`` holds the per-sample MACs.

    Raises:
        ConfigError: a grouped/dilated-unsupported conv for the skip path, a density outside (0, 1].
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.Module | None, density: float, name: str = "") -> None:
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise ConfigError(f"FBS: {name or 'layer'} is {type(conv).__name__}, expected Conv2d")
        if conv.groups != 1:
            raise ConfigError(
                f"FBS: {name or 'layer'} is a grouped conv (groups={conv.groups}), not supported"
            )
        if not 0.0 < density <= 1.0:
            raise ConfigError(f"FBS: density of {name or 'layer'} must be in (0, 1], got {density!r}")
        self.conv = conv
        self.bn = bn if bn is not None else nn.Identity()
        self.density = float(density)
        self.k = math.ceil(self.density * conv.out_channels - 1e-9)
        self.predictor = nn.Linear(conv.in_channels, conv.out_channels)
        nn.init.normal_(self.predictor.weight, std=0.01)
        nn.init.constant_(self.predictor.bias, 1.0)  # start with all saliencies alive
        self.mode = "masked"
        self.l1_hook = 0.0
        self.saliency: torch.Tensor | None = None
        self.gate: torch.Tensor | None = None
        self.macs: torch.Tensor | None = None

    def saliencies(self, x: torch.Tensor) -> torch.Tensor:
        """``s = ReLU(W_s · mean_{h,w}(x) + b_s)``, shape ``(N, C_out)`` (Gao et al. 2019, eq. 6)."""
        return F.relu(self.predictor(x.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.saliencies(x)
        gate = wta_mask(s, self.k)
        if self.l1_hook and s.requires_grad:
            n = s.shape[0]
            s.register_hook(lambda g, s=s: g + self.l1_hook * torch.sign(s.detach()) / n)
        self.saliency, self.gate = s, gate
        pi = s * gate
        if self.mode == "skip":
            return self._skip(x, pi, gate)
        return self.bn(self.conv(x)) * pi[:, :, None, None]

    def _bn_eval(self, z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        if isinstance(bn, nn.Identity):
            return z
        mean, var = bn.running_mean[idx], bn.running_var[idx]
        z = (z - mean[:, None, None]) * torch.rsqrt(var[:, None, None] + bn.eps)
        if bn.weight is not None:
            z = z * bn.weight[idx][:, None, None] + bn.bias[idx][:, None, None]
        return z

    @torch.no_grad()
    def _skip(self, x: torch.Tensor, pi: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        n = x.shape[0]
        kh, kw = conv.kernel_size
        out = None
        macs = torch.zeros(n, dtype=torch.long)
        alive_in = x.abs().flatten(2).sum(2) != 0  # (N, C_in): suppressed inputs are exact zeros
        for i in range(n):
            oi = gate[i].nonzero().flatten()
            ii = alive_in[i].nonzero().flatten()
            if ii.numel() == 0:  # an all-zero input: one (zero) channel keeps the shapes right
                ii = ii.new_zeros(1)
            w = conv.weight.index_select(0, oi).index_select(1, ii)
            b = conv.bias.index_select(0, oi) if conv.bias is not None else None
            z = F.conv2d(x[i : i + 1].index_select(1, ii), w, b, conv.stride, conv.padding, conv.dilation)
            z = self._bn_eval(z[0], oi) * pi[i, oi][:, None, None]
            if out is None:
                out = x.new_zeros(n, conv.out_channels, z.shape[1], z.shape[2])
            out[i, oi] = z
            macs[i] = (
                oi.numel() * ii.numel() * kh * kw * z.shape[1] * z.shape[2] + self.predictor.weight.numel()
            )
        self.macs = macs
        assert out is not None
        return out

    def dense_macs(self, x_shape: Sequence[int]) -> int:
        """MACs of the ungated conv on one sample of input shape ``(C_in, H, W)`` (or with batch dim)."""
        h, w = x_shape[-2], x_shape[-1]
        c = self.conv
        ho = (h + 2 * c.padding[0] - c.dilation[0] * (c.kernel_size[0] - 1) - 1) // c.stride[0] + 1
        wo = (w + 2 * c.padding[1] - c.dilation[1] * (c.kernel_size[1] - 1) - 1) // c.stride[1] + 1
        return c.out_channels * c.in_channels * c.kernel_size[0] * c.kernel_size[1] * ho * wo


class FBS:
    """Wrap every ``Conv2d`` followed by a ``BatchNorm2d`` in an ``nn.Sequential`` (VGG-style) in an
    :class:`FBSConv` with density ``d`` (the BatchNorm moves inside; an ``Identity`` takes its place).

    Own loop::

        fbs = FBS(model, density=0.5, lam=1e-4)      # before creating the optimizer
        loss = F.cross_entropy(model(x), y) + fbs.saliency_loss()

    With the :class:`~secateur.train.Trainer`, pass ``fbs`` as a callback: the L1 term's gradient is
    then added by a hook on each saliency tensor (``on_train_begin`` turns it on).

    Args:
        model: changed in place. density: fraction ``d`` in (0, 1] of output channels kept per sample.
        lam: λ >= 0 of the saliency loss. exclude: module paths of convs not to gate (e.g. the stem).

    Raises:
        ConfigError: bad density or λ, no Conv2d+BatchNorm2d pair found, an excluded path that does not
            exist (nothing is changed in these cases).
    """

    def __init__(
        self, model: nn.Module, density: float = 0.5, lam: float = 1e-4, exclude: Sequence[str] = ()
    ):
        if not 0.0 < density <= 1.0:
            raise ConfigError(f"FBS: density must be in (0, 1], got {density!r}")
        if lam < 0:
            raise ConfigError(f"FBS: lam must be >= 0, got {lam!r}")
        names = dict(model.named_modules())
        for e in exclude:
            if e not in names:
                raise ConfigError(f"FBS: exclude names {e!r}, which {type(model).__name__} does not have")
        pairs = []
        for path, mod in model.named_modules():
            if not isinstance(mod, nn.Sequential):
                continue
            kids = list(mod.named_children())
            for (n1, c), (n2, b) in zip(kids, kids[1:]):
                full = f"{path}.{n1}" if path else n1
                if isinstance(c, nn.Conv2d) and isinstance(b, nn.BatchNorm2d) and full not in exclude:
                    if c.groups != 1:
                        continue
                    pairs.append((mod, n1, n2, full))
        if not pairs:
            raise ConfigError(f"FBS: {type(model).__name__} has no Conv2d followed by BatchNorm2d to gate")
        self.model = model
        self.lam = float(lam)
        self.layers: dict[str, FBSConv] = {}
        for seq, n1, n2, full in pairs:
            conv, bn = getattr(seq, n1), getattr(seq, n2)
            layer = FBSConv(conv, bn, density, full).to(conv.weight.device)
            setattr(seq, n1, layer)
            setattr(seq, n2, nn.Identity())
            self.layers[full] = layer

    def saliency_loss(self) -> torch.Tensor:
        """``λ Σ_layers mean_n ||s||_1`` of the last forward pass (Gao et al. 2019, sec. 3.4)."""
        terms = [l.saliency.abs().sum(1).mean() for l in self.layers.values() if l.saliency is not None]
        if not terms:
            raise ConfigError("FBS.saliency_loss: run a forward pass first")
        return self.lam * sum(terms)

    def set_mode(self, mode: str) -> None:
        """``"masked"`` (training and reference) or ``"skip"`` (inference that skips suppressed channels)."""
        if mode not in ("masked", "skip"):
            raise ConfigError(f"FBS mode must be 'masked' or 'skip', got {mode!r}")
        for l in self.layers.values():
            l.mode = mode

    @torch.no_grad()
    def macs_per_sample(self, x: torch.Tensor) -> dict[str, Any]:
        """Run the skip path on ``x`` (N, C, H, W) and return ``{"gated": (N,) MACs of the gated convs and
        predictors per sample, "dense": MACs of the same convs ungated (one sample), "ratio": mean
        gated / dense}``. Layers outside FBS (pooling, classifier) are not counted."""
        was_training = self.model.training
        self.model.eval()
        self.set_mode("skip")
        shapes: dict[str, tuple[int, ...]] = {}
        hooks = [
            l.register_forward_pre_hook(lambda m, a, name=name: shapes.__setitem__(name, tuple(a[0].shape)))
            for name, l in self.layers.items()
        ]
        try:
            self.model(x)
        finally:
            for h in hooks:
                h.remove()
            self.set_mode("masked")
            self.model.train(was_training)
        gated = sum(l.macs for l in self.layers.values())
        dense = sum(l.dense_macs(shapes[n]) for n, l in self.layers.items())
        return {"gated": gated, "dense": int(dense), "ratio": float(gated.double().mean() / dense)}

    @torch.no_grad()
    def latency(self, x: torch.Tensor, repeats: int = 20) -> dict[str, float]:
        """Median wall-clock seconds per forward of ``x`` on the masked path and on the skip path (eval)."""
        was_training = self.model.training
        self.model.eval()
        out = {}
        try:
            for mode in ("masked", "skip"):
                self.set_mode(mode)
                self.model(x)
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    self.model(x)
                    times.append(time.perf_counter() - t0)
                out[mode] = sorted(times)[len(times) // 2]
        finally:
            self.set_mode("masked")
            self.model.train(was_training)
        return out

    def on_train_begin(self, trainer: Any) -> None:
        for l in self.layers.values():
            l.l1_hook = self.lam

    def on_train_end(self, trainer: Any) -> None:
        for l in self.layers.values():
            l.l1_hook = 0.0
