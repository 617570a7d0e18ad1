"""Feature boosting and suppression (Gao et al. 2019, "Dynamic Channel Pruning: Feature Boosting and
Suppression", ICLR, sec. 3.2-3.4).

Each gated convolution gets a small saliency predictor from its *input*:
``s = ReLU(W_s · pool(x) + b_s)`` with ``pool`` the global average over space, shape ``(N, C_out)``
(sec. 3.3, eq. 6; the subsampling is the spatial mean here). A per-sample k-winners-take-all keeps
the ``k = ⌈d · C_out⌉`` largest saliencies (``d`` the density) and zeroes the rest:
``π = wta_k(s)`` (eq. 5). The layer output is ``π ⊙ norm(conv(x))`` (eq. 7): the kept channels are
*boosted* by their saliency, the others *suppressed* to exact zeros, so their computation can be
skipped at inference, and so can the next layer's matching input channels.

Training adds the L1 saliency loss ``λ Σ_layers mean_n ||s||_1`` (sec. 3.4) to the task loss
(:meth:`FBS.penalty`; the :class:`~secateur.train.Trainer` adds it through ``extra_loss``).

Any network where a ``Conv2d``'s output feeds only a ``BatchNorm2d`` can be gated, residual networks
included: the pairs are found by one traced forward pass (the BatchNorm's input must be the conv's output
and nothing else may read it), the conv is replaced by :class:`FBSConv` (conv, BatchNorm, gate) and the
BatchNorm by an ``Identity``, so in a residual block the gate acts after the BatchNorm and before the
residual sum, as in the paper's ResNet experiments.
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
from torch.overrides import TorchFunctionMode

from secateur._torch import call_model, iter_tensors
from secateur.compact import restoring
from secateur.errors import ConfigError
from secateur.scope import Scope

__all__ = ["FBS", "FBSConv", "find_conv_bn_pairs", "wta_mask"]


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
    channels zero for every sample. ``mode``: ``"masked"`` (default), ``"skip"`` (inference only,
    BatchNorm read in eval form) or ``"dense"`` (no gate: ``BN(conv(x))``, the network before FBS).
    After each gated forward, ``saliency`` ``(N, C_out)`` holds ``s`` and ``gate`` the bool k-WTA mask;
    in skip mode ``macs`` ``(N,)`` holds the per-sample MACs.

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
        self.saliency: torch.Tensor | None = None
        self.gate: torch.Tensor | None = None
        self.macs: torch.Tensor | None = None

    def saliencies(self, x: torch.Tensor) -> torch.Tensor:
        """``s = ReLU(W_s · mean_{h,w}(x) + b_s)``, shape ``(N, C_out)`` (Gao et al. 2019, eq. 6)."""
        return F.relu(self.predictor(x.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "dense":
            return self.bn(self.conv(x))
        s = self.saliencies(x)
        gate = wta_mask(s, self.k)
        self.saliency, self.gate = s, gate
        pi = s * gate
        if self.mode == "skip":
            return self._skip(x, pi, gate)
        # suppressed channels are exact zeros even if BN(conv(x)) overflowed there (inf * 0 would be nan)
        z = self.bn(self.conv(x)) * pi[:, :, None, None]
        return torch.where(gate[:, :, None, None], z, torch.zeros((), dtype=z.dtype, device=z.device))

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


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, attr = path.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


class _UseCounter(TorchFunctionMode):
    """Counts, for each traced conv output, the torch calls that read it outside its BatchNorm's forward."""

    def __init__(self, outputs: dict[int, tuple[str, torch.Tensor]], uses: dict[str, int]) -> None:
        super().__init__()
        self.outputs, self.uses = outputs, uses
        self.inside_bn = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not self.inside_bn and self.outputs:
            for t in iter_tensors((args, kwargs)):
                hit = self.outputs.get(id(t))
                if hit is not None and hit[1] is t:
                    self.uses[hit[0]] += 1
        return func(*args, **kwargs)


def find_conv_bn_pairs(model: nn.Module, example_inputs: Any) -> tuple[dict[str, str], dict[str, str]]:
    """Which ``Conv2d`` feed exactly one ``BatchNorm2d`` and nothing else, from one traced forward pass.

    Args:
        model: any ``nn.Module``; run once in eval mode under ``torch.no_grad`` on ``example_inputs`` (a
            tensor, a tuple of positional inputs or a dict of keyword inputs). Modes are restored and
            BatchNorm statistics are not updated; every hook is removed before returning.

    Returns ``(pairs, refused)``: ``pairs`` maps a conv's module path to its BatchNorm's path, when the
    BatchNorm's input *is* the conv's output tensor, nothing outside that BatchNorm's forward reads it,
    and each of the two modules runs once per forward (so ``BN(conv(x))`` can be fused into one module);
    ``refused`` maps every other ``Conv2d`` path to the reason it cannot be fused.

    Raises:
        ConfigError: the forward pass fails on ``example_inputs`` (the message carries the cause).
    """
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    calls: dict[str, int] = dict.fromkeys(list(convs) + list(bns), 0)
    outputs: dict[int, tuple[str, torch.Tensor]] = {}
    uses: dict[str, int] = dict.fromkeys(convs, 0)
    fed: dict[str, list[str]] = {n: [] for n in convs}
    counter = _UseCounter(outputs, uses)
    handles = []

    def conv_post(name: str) -> Any:
        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            calls[name] += 1
            if isinstance(out, torch.Tensor):
                outputs[id(out)] = (name, out)

        return hook

    def bn_pre(name: str) -> Any:
        def hook(mod: nn.Module, args: Any) -> None:
            calls[name] += 1
            counter.inside_bn += 1
            x = args[0] if args else None
            hit = outputs.get(id(x)) if isinstance(x, torch.Tensor) else None
            if hit is not None and hit[1] is x:
                fed[hit[0]].append(name)

        return hook

    def bn_post(mod: nn.Module, args: Any, out: Any) -> None:
        counter.inside_bn -= 1

    for n, m in convs.items():
        handles.append(m.register_forward_hook(conv_post(n)))
    for n, m in bns.items():
        handles.append(m.register_forward_pre_hook(bn_pre(n)))
        handles.append(m.register_forward_hook(bn_post))
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), counter:
            call_model(model, example_inputs)
    except Exception as exc:
        raise ConfigError(
            f"FBS: the forward pass of {type(model).__name__} on example_inputs failed: {exc!r}"
        ) from exc
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
    pairs: dict[str, str] = {}
    refused: dict[str, str] = {}
    for n in convs:
        if calls[n] != 1:
            refused[n] = f"runs {calls[n]} times per forward (need once)"
        elif len(fed[n]) != 1:
            refused[n] = (
                "its output does not go into a BatchNorm2d" if not fed[n] else "feeds several BatchNorms"
            )
        elif calls[fed[n][0]] != 1:
            refused[n] = f"its BatchNorm {fed[n][0]} runs {calls[fed[n][0]]} times per forward"
        elif uses[n]:
            refused[n] = (
                f"its output is also read outside {fed[n][0]} ({uses[n]} other uses, e.g. a shortcut)"
            )
        else:
            pairs[n] = fed[n][0]
    return pairs, refused


def _sequential_pairs(model: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    """Conv2d directly followed by BatchNorm2d inside an ``nn.Sequential`` (no trace needed)."""
    pairs: dict[str, str] = {}
    for path, mod in model.named_modules():
        if not isinstance(mod, nn.Sequential):
            continue
        kids = list(mod.named_children())
        for (n1, c), (n2, b) in zip(kids, kids[1:]):
            if isinstance(c, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                pairs[f"{path}.{n1}" if path else n1] = f"{path}.{n2}" if path else n2
    refused = {
        n: "not followed by a BatchNorm2d in an nn.Sequential (pass example_inputs to trace other models)"
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and n not in pairs
    }
    return pairs, refused


class FBS:
    """Gate the output channels of chosen ``Conv2d`` + ``BatchNorm2d`` pairs per sample (Gao et al. 2019).

    Each selected conv is replaced by an :class:`FBSConv` holding the conv, its BatchNorm and a saliency
    predictor; the BatchNorm's place gets an ``Identity``. Pairs are found by
    :func:`find_conv_bn_pairs` when ``example_inputs`` is given (any model: VGG, ResNet blocks, where
    the gate then sits after ``bn2`` and before the residual sum, downsample shortcuts, stems); without
    it only a ``Conv2d`` directly followed by a ``BatchNorm2d`` in an ``nn.Sequential`` is found. After
    the swap the network with every gate open (mode ``"dense"``) is checked against the original on
    ``example_inputs``; :meth:`remove` puts the original modules back. The swap and its check are one
    transaction: a failed check, an error or a ``KeyboardInterrupt`` puts the original modules back before
    the exception propagates.

    Own loop::

        fbs = FBS(model, density=0.5, lam=1e-4, example_inputs=x[:2])   # before creating the optimizer
        loss = F.cross_entropy(model(x), y) + fbs.penalty()

    With the :class:`~secateur.train.Trainer`, pass ``fbs`` as a callback: ``extra_loss`` returns the same
    :meth:`penalty`, added to the task loss before backward. No hooks are installed.

    Args:
        model: changed in place. density: fraction ``d`` in (0, 1] of output channels kept per sample.
        lam: λ >= 0 of the saliency loss.
        example_inputs: inputs for the pair-finding trace and the check (a tensor ``(N, C, H, W)``, a
            tuple or a dict); ``None``: ``nn.Sequential`` adjacency only.
        include: glob patterns of conv module paths to gate (``None``: every conv that can be paired). A
            conv matched by ``include`` that cannot be gated is an error naming it and the reason.
        exclude: glob patterns (or exact paths) of convs never gated, e.g. the stem ``"conv1"``.

    Attributes:
        layers: ``{conv path: FBSConv}``. bn_of: ``{conv path: BatchNorm path}``. refused: ``{conv path:
        reason}`` for unselected convs that could not be paired.

    Raises:
        ConfigError: bad density or λ, a pattern matching no module, a conv chosen by ``include`` that
            cannot be gated, nothing to gate, or a failed check (nothing is changed in these cases).
    """

    def __init__(
        self,
        model: nn.Module,
        density: float = 0.5,
        lam: float = 1e-4,
        exclude: Sequence[str] = (),
        *,
        example_inputs: Any = None,
        include: Sequence[str] | None = None,
    ):
        if not 0.0 < density <= 1.0:
            raise ConfigError(f"FBS: density must be in (0, 1], got {density!r}")
        if not (isinstance(lam, (int, float)) and lam >= 0):
            raise ConfigError(f"FBS: lam must be a number >= 0, got {lam!r}")
        done = [n for n, m in model.named_modules() if isinstance(m, FBSConv)]
        if done:
            raise ConfigError(f"FBS: {type(model).__name__} already has FBS gates ({done[0]}, ...)")
        scope = Scope(
            types=(nn.Conv2d,), include=None if include is None else list(include), exclude=list(exclude)
        )
        try:
            chosen = [t.name.rpartition(".")[0] for t in scope.resolve(model)]
        except ConfigError as exc:
            raise ConfigError(f"FBS: {exc}") from exc
        if example_inputs is None:
            pairs, refused = _sequential_pairs(model)
        else:
            pairs, refused = find_conv_bn_pairs(model, example_inputs)
        for name in chosen:
            conv = model.get_submodule(name)
            if name in pairs and conv.groups != 1:
                pairs.pop(name)
                refused[name] = f"a grouped conv (groups={conv.groups}), not supported"
        if include is not None:
            bad = [f"{n} ({refused[n]})" for n in chosen if n not in pairs]
            if bad:
                raise ConfigError(f"FBS: cannot gate {', '.join(bad)}")
        selected = [n for n in chosen if n in pairs]
        if not selected:
            raise ConfigError(f"FBS: {type(model).__name__} has no Conv2d followed by BatchNorm2d to gate")
        self.model = model
        self.lam = float(lam)
        self.density = float(density)
        self.bn_of = {n: pairs[n] for n in selected}
        self.refused = {n: r for n, r in refused.items() if n in chosen}
        reference = self._outputs(example_inputs)
        self.layers: dict[str, FBSConv] = {}
        for name in selected:
            conv, bn = model.get_submodule(name), model.get_submodule(pairs[name])
            self.layers[name] = FBSConv(conv, bn, density, name).to(conv.weight.device)
        # a transaction: on a failed check or any interrupt the original modules go back
        with restoring(lambda: self._swap(install=False)):
            self._swap(install=True)
            if reference is not None:
                self.set_mode("dense")
                try:
                    after = self._outputs(example_inputs)
                finally:
                    self.set_mode("masked")
                same = after is not None and len(after) == len(reference)
                same = same and all(
                    torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(after, reference)
                )
                if not same:
                    raise ConfigError(
                        f"FBS: fusing {sorted(self.bn_of.items())} changed {type(model).__name__}'s output; "
                        "nothing was changed (report this model: a conv output is read somewhere untraced)"
                    )

    def _outputs(self, example_inputs: Any) -> list[torch.Tensor] | None:
        if example_inputs is None:
            return None
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        try:
            with torch.no_grad():
                return [t.detach().clone() for t in iter_tensors(call_model(self.model, example_inputs))]
        finally:
            for m, t in modes.items():
                m.training = t

    def _swap(self, install: bool) -> None:
        for name, layer in self.layers.items():
            conv_parent, conv_attr = _parent(self.model, name)
            bn_parent, bn_attr = _parent(self.model, self.bn_of[name])
            if install:
                setattr(conv_parent, conv_attr, layer)
                setattr(bn_parent, bn_attr, nn.Identity())
            else:
                setattr(conv_parent, conv_attr, layer.conv)
                setattr(bn_parent, bn_attr, layer.bn)

    def remove(self) -> nn.Module:
        """Put the original ``Conv2d`` and ``BatchNorm2d`` modules back (with their trained weights) and
        drop the predictors; returns the model, which then computes the ungated network."""
        self._swap(install=False)
        self.layers = {}
        return self.model

    def saliency_loss(self) -> torch.Tensor:
        """``λ Σ_layers mean_n ||s||_1`` of the last forward pass (Gao et al. 2019, sec. 3.4), a scalar with
        a graph to the predictors.

        Raises:
            ConfigError: no forward pass since FBS was attached.
        """
        terms = [l.saliency.abs().sum(1).mean() for l in self.layers.values() if l.saliency is not None]
        if not terms:
            raise ConfigError("FBS.saliency_loss: run a forward pass first")
        return self.lam * sum(terms)

    def penalty(self) -> torch.Tensor:
        """The term to add to your loss: :meth:`saliency_loss`."""
        return self.saliency_loss()

    def set_mode(self, mode: str) -> None:
        """``"masked"`` (training and reference), ``"skip"`` (inference that skips suppressed channels) or
        ``"dense"`` (every gate open: the network before FBS)."""
        if mode not in ("masked", "skip", "dense"):
            raise ConfigError(f"FBS mode must be 'masked', 'skip' or 'dense', got {mode!r}")
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

    def extra_loss(self, trainer: Any) -> torch.Tensor | None:
        """Trainer hook: :meth:`penalty` (``None`` when ``lam == 0``)."""
        return None if self.lam == 0.0 else self.saliency_loss()
