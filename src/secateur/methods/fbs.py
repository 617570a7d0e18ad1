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
(:meth:`FBS.penalty`; the :class:`~secateur.train.Trainer` adds it through ``extra_loss``): FBS is a
training hook.

Which convolutions can be gated: a ``Conv2d`` whose output feeds only a ``BatchNorm2d``, residual networks
included. The pairs come from the dependency graph's trace (:func:`secateur.graph.tracer.run_trace`): a
BatchNorm whose channel dim carries exactly the atoms of a conv's output channels reads that conv's
output; that the BatchNorm reads it *directly* and that nothing else reads it is then checked by fusing
the pairs on a copy whose BatchNorm statistics are drawn at random (:func:`find_conv_bn_pairs`). The conv
is replaced by :class:`FBSConv` (conv, BatchNorm, gate) and the BatchNorm by an ``Identity``, so in a
residual block the gate acts after the BatchNorm and before the residual sum, as in the paper's ResNet
experiments. :class:`FBSConv` has two numerically equal inference paths: ``"masked"`` (dense conv, then
the gate) and ``"skip"``, which per sample computes only the kept output channels from the non-zero input
channels; :meth:`FBS.macs_per_sample` reports what the skip path costs and :meth:`FBS.latency` times both
(:func:`secateur.analysis.latency.compare_callables`).

:meth:`FBS.prune_static` is a static export (not part of Gao et al.'s method, whose gates stay dynamic):
the gates' mean boost over some data (:class:`GateUsage`, a group criterion) ranks the gated channels,
the gates come off, and the least-used channels are removed by the structured driver
(:func:`secateur.methods.slimming.prune_scored`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from secateur._torch import call_model, eval_mode, iter_tensors
from secateur.analysis.latency import compare_callables
from secateur.compact import restoring
from secateur.criteria.group import GroupCriterion, producer_members
from secateur.criteria.group.base import unit_mean
from secateur.errors import ConfigError, GraphError
from secateur.graph.groups import Group
from secateur.graph.rules import MODULE_RULES, RULES
from secateur.graph.tracer import run_trace
from secateur.methods.slimming import prune_scored
from secateur.scope import Scope

__all__ = ["FBS", "FBSConv", "GateUsage", "find_conv_bn_pairs", "wta_mask"]


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


def _norm_atoms(param_dims: dict, path: str) -> np.ndarray | None:
    """The traced atoms of a BatchNorm's channel dim (its scale, or its running mean without one)."""
    for attr in ("weight", "running_mean"):
        rec = param_dims.get((f"{path}.{attr}", 0))
        if rec is not None:
            return rec.atoms
    return None


def _candidate_pairs(model: nn.Module, example_inputs: Any) -> tuple[dict[str, str], dict[str, str]]:
    """``(conv -> BatchNorm, conv -> reason)`` from the graph tracer's records: a BatchNorm2d pairs with the
    Conv2d whose output-channel atoms its channel dim carries (it reads that conv's output, or an
    elementwise function of it)."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        tracer, _ = run_trace(model, example_inputs, RULES, MODULE_RULES)
    except GraphError as exc:
        raise ConfigError(f"FBS: tracing {type(model).__name__} on example_inputs failed: {exc}") from exc
    bn_atoms = {b: a for b in bns if (a := _norm_atoms(tracer.param_dims, b)) is not None}
    pairs: dict[str, str] = {}
    refused: dict[str, str] = {}
    for name, conv in convs.items():
        rec = tracer.param_dims.get((f"{name}.weight", 0))
        if rec is None:
            ran = id(conv) in tracer.called
            refused[name] = "has a single output channel" if ran else "does not run on example_inputs"
            continue
        fed = [b for b, a in bn_atoms.items() if a.shape == rec.atoms.shape and np.array_equal(a, rec.atoms)]
        if len(fed) == 1:
            pairs[name] = fed[0]
        else:
            refused[name] = (
                "its output does not go into a BatchNorm2d"
                if not fed
                else f"its output channels reach several BatchNorms ({', '.join(fed)})"
            )
    return pairs, refused


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _fusion_changes_output(model: nn.Module, pairs: dict[str, str], example_inputs: Any) -> bool:
    """Whether replacing each conv of ``pairs`` by ``BN ∘ conv`` and its BatchNorm by ``Identity`` changes the
    output, on a copy of ``model`` whose paired BatchNorms get random statistics and affine parameters (so
    that a BatchNorm close to the identity cannot hide a wrong pairing)."""
    probe = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b in pairs.values():
            bn = probe.get_submodule(b)
            for attr, draw in (
                ("running_mean", lambda n: torch.randn(n, generator=gen)),
                ("running_var", lambda n: torch.rand(n, generator=gen) * 1.5 + 0.5),
                ("weight", lambda n: torch.randn(n, generator=gen)),
                ("bias", lambda n: torch.randn(n, generator=gen)),
            ):
                t = getattr(bn, attr, None)
                if isinstance(t, torch.Tensor):
                    t.copy_(draw(t.numel()).to(t.dtype))
    reference = _outputs(probe, example_inputs)
    for c, b in pairs.items():
        conv, bn = probe.get_submodule(c), probe.get_submodule(b)
        _set_module(probe, c, nn.Sequential(conv, bn))
        _set_module(probe, b, nn.Identity())
    try:
        fused = _outputs(probe, example_inputs)
    except Exception:
        return True
    return len(fused) != len(reference) or not all(_close(a, r) for a, r in zip(fused, reference))


def _close(a: torch.Tensor, ref: torch.Tensor) -> bool:
    """Same shape and values within ``1e-4`` relative to ``ref``'s largest magnitude (float32 rounding)."""
    if a.shape != ref.shape:
        return False
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    return torch.allclose(a, ref, rtol=1e-4, atol=1e-5 * scale)


def _outputs(model: nn.Module, example_inputs: Any) -> list[torch.Tensor]:
    """Every output tensor of one eval-mode forward under ``no_grad`` (modes restored)."""
    with eval_mode(model), torch.no_grad():
        return [t.detach().clone() for t in iter_tensors(call_model(model, example_inputs))]


def find_conv_bn_pairs(model: nn.Module, example_inputs: Any) -> tuple[dict[str, str], dict[str, str]]:
    """Which ``Conv2d`` feed exactly one ``BatchNorm2d`` and nothing else.

    Candidates come from the dependency graph's trace (:func:`secateur.graph.tracer.run_trace`, on meta
    tensors when the model allows): a BatchNorm whose channel dim carries exactly the atoms of a conv's
    output channels. They are then checked together on a copy of the model with random BatchNorm
    statistics: ``BN ∘ conv`` in the conv's place and ``Identity`` in the BatchNorm's must leave the
    output unchanged (which fails when something else reads the conv's output, an op sits between the two,
    or one of them runs more than once); if they fail together, each is checked alone and the failing
    ones are refused.

    Args:
        model: any ``nn.Module`` the dependency graph traces; not changed (the check runs on a copy).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs.

    Returns ``(pairs, refused)``: ``pairs`` maps a conv's module path to its BatchNorm's path; ``refused``
    maps every other ``Conv2d`` path to the reason it cannot be fused.

    Raises:
        ConfigError: tracing fails on ``example_inputs`` (the graph's error, e.g. an op without a coupling
            rule, named with its module, is in the message).
        InvalidModelError: from the trace (not a module, or meta tensors).
    """
    pairs, refused = _candidate_pairs(model, example_inputs)
    if pairs and _fusion_changes_output(model, pairs, example_inputs):
        for c, b in list(pairs.items()):
            if _fusion_changes_output(model, {c: b}, example_inputs):
                del pairs[c]
                refused[c] = (
                    f"fusing it with {b} changes the model's output: its output is also read outside {b}, "
                    "an op sits between the two, or one of them runs more than once"
                )
    return pairs, refused


class GateUsage(GroupCriterion):
    """How much the FBS gates use each channel: the mean of ``π = wta_k(s)`` over samples (0 for a channel
    no gate kept), per output channel of every gated conv (:meth:`FBS.gate_usage`).

    A group is scored when every conv / linear layer producing it is gated (the mean over them); a group
    that an ungated layer also writes (a residual stream fed by an ungated stem) is not scored, so left
    whole. Usage is a mean boost, on one scale in every layer (``comparable``).

    Args:
        usage: ``{conv module path: (C_out,) mean π}``.
    """

    name = "fbs_usage"
    comparable = True

    def __init__(self, usage: dict[str, torch.Tensor]) -> None:
        self.usage = {k: v.detach().double().cpu().numpy() for k, v in usage.items()}

    def group_scores(self, group: Group, model: nn.Module) -> np.ndarray | None:  # type: ignore[override]
        producers = producer_members(group, model)
        if not producers or any(m.module not in self.usage for m in producers):
            return None
        return np.mean([unit_mean(self.usage[m.module], m, group.n_units) for m in producers], axis=0)


class FBS:
    """Gate the output channels of chosen ``Conv2d`` + ``BatchNorm2d`` pairs per sample (Gao et al. 2019).

    Each selected conv is replaced by an :class:`FBSConv` holding the conv, its BatchNorm and a saliency
    predictor; the BatchNorm's place gets an ``Identity``. Pairs are found by :func:`find_conv_bn_pairs`
    (any model the dependency graph traces: VGG, ResNet blocks, where the gate then sits after ``bn2`` and
    before the residual sum, downsample shortcuts, stems). After the swap the network with every gate open
    (mode ``"dense"``) is checked against the original on ``example_inputs``; :meth:`remove` puts the
    original modules back. The swap and its check are one
    transaction: a failed check, an error or a ``KeyboardInterrupt`` puts the original modules back before
    the exception propagates.

    Own loop::

        fbs = FBS(model, x[:2], density=0.5, lam=1e-4)   # before creating the optimizer
        loss = F.cross_entropy(model(x), y) + fbs.penalty()

    With the :class:`~secateur.train.Trainer`, pass ``fbs`` as a callback: ``extra_loss`` returns the same
    :meth:`penalty`, added to the task loss before backward. No hooks are installed.

    Args:
        model: changed in place.
        example_inputs: inputs for the pair-finding trace and the checks (a tensor ``(N, C, H, W)``, a
            tuple or a dict).
        density: fraction ``d`` in (0, 1] of output channels kept per sample.
        lam: λ >= 0 of the saliency loss.
        include: glob patterns of conv module paths to gate (``None``: every conv that can be paired). A
            conv matched by ``include`` that cannot be gated is an error naming it and the reason.
        exclude: glob patterns (or exact paths) of convs never gated, e.g. the stem ``"conv1"``.

    Attributes:
        layers: ``{conv path: FBSConv}``.
        bn_of: ``{conv path: BatchNorm path}``.
        refused: ``{conv path: reason}`` for unselected convs that could not be paired.

    Raises:
        ConfigError: bad density or λ, a pattern matching no module, a conv chosen by ``include`` that
            cannot be gated, nothing to gate, a failed trace (the dependency graph's message, naming the
            op and module) or check (nothing is changed in these cases).
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        density: float = 0.5,
        lam: float = 1e-4,
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
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
            self.set_mode("dense")
            try:
                after = self._outputs(example_inputs)
            finally:
                self.set_mode("masked")
            same = len(after) == len(reference) and all(
                torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(after, reference)
            )
            if not same:
                raise ConfigError(
                    f"FBS: fusing {sorted(self.bn_of.items())} changed {type(model).__name__}'s output; "
                    "nothing was changed (report this model: a conv output is read somewhere untraced)"
                )

    def _outputs(self, example_inputs: Any) -> list[torch.Tensor]:
        return _outputs(self.model, example_inputs)

    def _swap(self, install: bool) -> None:
        for name, layer in self.layers.items():
            _set_module(self.model, name, layer if install else layer.conv)
            _set_module(self.model, self.bn_of[name], nn.Identity() if install else layer.bn)

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
        shapes: dict[str, tuple[int, ...]] = {}
        hooks = [
            l.register_forward_pre_hook(lambda m, a, name=name: shapes.__setitem__(name, tuple(a[0].shape)))
            for name, l in self.layers.items()
        ]
        self.set_mode("skip")
        try:
            with eval_mode(self.model):
                self.model(x)
        finally:
            for h in hooks:
                h.remove()
            self.set_mode("masked")
        gated = sum(l.macs for l in self.layers.values())
        dense = sum(l.dense_macs(shapes[n]) for n, l in self.layers.items())
        return {"gated": gated, "dense": int(dense), "ratio": float(gated.double().mean() / dense)}

    def latency(self, x: torch.Tensor, repeats: int = 20) -> dict[str, dict[str, Any]]:
        """Forward latency of ``x`` on the masked path and on the skip path (eval mode, ``no_grad``), timed
        interleaved in one run by :func:`secateur.analysis.latency.compare_callables`.

        Returns ``{"masked": {...}, "skip": {...}}``, each that function's dict (``"median_ms"``,
        ``"iqr_ms"``, ... milliseconds per forward of the whole ``x``).

        Raises:
            ConfigError: ``repeats`` < 1.
        """

        def path(mode: str) -> Any:
            def forward() -> Any:
                self.set_mode(mode)
                return self.model(x)

            return forward

        try:
            with eval_mode(self.model), torch.no_grad():
                return compare_callables({"masked": path("masked"), "skip": path("skip")}, repeats=repeats)
        finally:
            self.set_mode("masked")

    # -- static export --------------------------------------------------------------------------------
    @torch.no_grad()
    def gate_usage(self, data: Any) -> dict[str, torch.Tensor]:
        """``{conv path: (C_out,) float64 mean π}``: the gate output ``π = wta_k(s)`` averaged over every
        sample of ``data`` (one batch or an iterable of batches; a batch is an input or ``(input, target)``),
        masked path, eval mode. A channel no gate kept on any sample has usage 0.

        Raises:
            ConfigError: ``data`` holds no batch.
        """
        sums = {n: torch.zeros(l.conv.out_channels, dtype=torch.float64) for n, l in self.layers.items()}
        seen = 0
        with eval_mode(self.model):
            for batch in _batches(data):
                call_model(self.model, batch[0] if isinstance(batch, (tuple, list)) else batch)
                for n, l in self.layers.items():
                    assert l.saliency is not None and l.gate is not None
                    sums[n] += (l.saliency * l.gate).double().sum(0).cpu()
                seen += int(next(iter(self.layers.values())).gate.shape[0])  # type: ignore[union-attr]
        if seen == 0:
            raise ConfigError("FBS.gate_usage: data holds no batch")
        return {n: v / seen for n, v in sums.items()}

    def prune_static(
        self,
        example_inputs: Any,
        data: Any,
        sparsity: float | None = None,
        protect: Sequence[str] = (),
        verify: bool = True,
    ) -> tuple[nn.Module, dict]:
        """Static export: take the gates off and remove, in every gated layer, the channels the gates used
        least on ``data`` (:meth:`gate_usage`, as the :class:`GateUsage` criterion) through the structured
        driver (:func:`secateur.methods.slimming.prune_scored`, uniform allocation, the oracle inside the
        transaction with ``verify``). The result is the plain network (original convs and BatchNorms, no
        boosting) without those channels: fine-tune it.

        Args:
            example_inputs: inputs to trace the ungated network and run the oracle on.
            data: batches for :meth:`gate_usage`.
            sparsity: fraction in [0, 1) of each scored group's channels to remove (default ``1 - density``:
                keep as many channels as each gate keeps per sample). Groups an ungated layer also writes
                are left whole (:class:`GateUsage`).
            protect: module name patterns never pruned.

        Returns ``(model, plan)``; afterwards this FBS is empty (as after :meth:`remove`).

        Raises:
            ConfigError: bad ``sparsity``, empty ``data``. In every case the gates stay installed and the
                model is as it was.
            CompactionError: compaction or the oracle failed (gates and model as they were, too).
        """
        if sparsity is None:
            sparsity = 1.0 - self.density
        if not 0.0 <= sparsity < 1.0:
            raise ConfigError(f"FBS.prune_static: sparsity must be in [0, 1), got {sparsity!r}")
        criterion = GateUsage(self.gate_usage(data))
        with restoring(lambda: self._swap(install=True)):
            self._swap(install=False)
            out = prune_scored(self.model, example_inputs, criterion, sparsity, "uniform", protect, verify)
        self.layers = {}
        return out

    def extra_loss(self, trainer: Any) -> torch.Tensor | None:
        """Trainer hook: :meth:`penalty` (``None`` when ``lam == 0``)."""
        return None if self.lam == 0.0 else self.saliency_loss()


def _batches(data: Any) -> Iterable[Any]:
    """``data`` as an iterable of batches: one tensor, or one ``(input, target)`` pair, is one batch."""
    if isinstance(data, torch.Tensor):
        return [data]
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return [data]
    return data
