"""SCOP: scientific control for reliable network pruning (Tang et al. 2020, NeurIPS, sec. 3).

Knockoff data ``X̃`` (samples of a generative model trained on the user's data, with the data's
distribution but no tie to the labels) act as a *control group*. The network runs on the real half
and the knockoff half of one batch side by side; after each prunable convolution the real features
are mixed with the knockoff ones,

    real ← β ⊙ conv(x) + (1 - β) ⊙ conv(x̃),      knockoff ← conv(x̃),

with one ``β ∈ [0, 1]`` per output channel (sec. 3.2, eq. 7). Only the ``β`` are learned, on the
task loss of the real half, while the network is frozen (eval mode, no weight updates). A filter
whose real feature matters keeps ``β`` near 1; one the knockoff can replace drifts down. A filter's
importance is ``|γ_BN| · (2β - 1)`` (the ``β - β̃`` of sec. 3.3 with ``β̃ = 1 - β``, weighted by the
scale of the following BatchNorm), and the lowest-scoring filters are removed through the dependency
graph, then the network is fine-tuned.

:class:`SCOP` is the training hook (the mixing and the ``β``) *and* a group criterion
(:class:`~secateur.criteria.group.GroupCriterion`): ``ChannelPruner(model, x, criterion=scop, ...)`` and
``prune_channels(model, x, sparsity, criterion=scop)`` rank channels by its scores; :meth:`SCOP.prune` is
one such call of the structured driver.

For Fashion-MNIST the knockoff generator is a small VAE trained here (:func:`train_knockoff_vae`;
Kingma & Welling 2014); any callable ``n -> (n, *input_shape)`` works.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from secateur.criteria.group import BNScaleCriterion, GroupCriterion
from secateur.criteria.group.base import unit_mean
from secateur.errors import ConfigError
from secateur.graph.groups import Group
from secateur.methods.slimming import prune_scored

__all__ = ["SCOP", "KnockoffVAE", "train_knockoff_vae"]


class KnockoffVAE(nn.Module):
    """A small fully connected VAE (Kingma & Welling 2014) whose prior samples are SCOP's knockoffs.

    ``shape``: one example's shape, e.g. ``(1, 28, 28)``. Encoder ``D -> hidden -> 2·latent``,
    decoder ``latent -> hidden -> D`` (linear output: inputs may be normalised, not in [0, 1]).
    """

    def __init__(self, shape: Sequence[int], latent: int = 16, hidden: int = 256) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        d = int(np.prod(self.shape))
        self.latent = latent
        self.enc = nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent))
        self.dec = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, d))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Negative ELBO per example (Gaussian decoder, unit variance: squared error / 2, plus KL)."""
        mu, logvar = self.enc(x).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        rec = self.dec(z)
        nll = 0.5 * (rec - x.flatten(1)).pow(2).sum(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)
        return (nll + kl).mean()

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """``n`` knockoff examples ``(n, *shape)`` decoded from the prior ``z ~ N(0, I)``."""
        p = next(self.parameters())
        z = torch.randn(n, self.latent, device=p.device, dtype=p.dtype)
        return self.dec(z).reshape(n, *self.shape)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # generator protocol: g(n) -> samples
        if len(args) == 1 and isinstance(args[0], int) and not kwargs:
            return self.sample(args[0])
        return super().__call__(*args, **kwargs)


def train_knockoff_vae(
    loader: Iterable[Any],
    epochs: int = 2,
    latent: int = 16,
    hidden: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
) -> KnockoffVAE:
    """Train a :class:`KnockoffVAE` on the inputs of ``loader`` (``(x, y)`` batches; labels unused).

    Raises:
        ConfigError: ``epochs`` < 1 or an empty loader.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"train_knockoff_vae: epochs must be an int >= 1, got {epochs!r}")
    torch.manual_seed(seed)
    vae: KnockoffVAE | None = None
    opt = None
    for _ in range(epochs):
        for x, _y in loader:
            if vae is None:
                vae = KnockoffVAE(x.shape[1:], latent, hidden).to(x.device)
                opt = torch.optim.Adam(vae.parameters(), lr=lr)
            assert opt is not None
            loss = vae.loss(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
    if vae is None:
        raise ConfigError("train_knockoff_vae: the loader yielded no batch")
    return vae.eval()


class SCOP(GroupCriterion):
    """Knockoff mixing after every selected ``Conv2d``, the learned per-channel ``β``, and the criterion
    ``|γ_BN| · (2β - 1)`` they define.

    Usage::

        scop = SCOP(model, knockoff=vae, init_beta=0.5)
        scop.fit(train_loader, steps=200)                # β only; the network stays frozen
        model, plan = scop.prune(example_inputs, sparsity=0.5)   # removes through the graph, detaches
        # fine-tune `model` as usual

    As a criterion (``name = "scop"``): ``ChannelPruner(model, x, schedule=0.5, criterion=scop)`` or
    ``prune_channels(model, x, 0.5, criterion=scop)``; groups that no controlled conv produces are not
    scored (left whole). The driver's ``close()`` / ``finalize()`` call :meth:`detach`. Scores are on one
    scale across layers (``comparable``): a global ranking compares them as they are.

    Own loop: ``logits = scop(x)`` (the real half's logits, shape ``(N, classes)``), a loss on them,
    an optimizer over ``scop.betas()``, then ``scop.clamp_()`` after each step.

    Args:
        model: any network with ``Conv2d`` layers (BatchNorm after them weights the score).
        knockoff: callable ``n -> (n, *input shape)`` tensor, e.g. a trained :class:`KnockoffVAE`.
        layers: module paths of the convs to control (default every ``Conv2d``).
        init_beta: initial ``β`` in [0, 1].

    Raises:
        ConfigError: no conv selected, a path that is not a ``Conv2d``, ``init_beta`` outside [0, 1].
    """

    name = "scop"
    comparable = True

    def __init__(
        self,
        model: nn.Module,
        knockoff: Callable[[int], torch.Tensor],
        layers: Sequence[str] | None = None,
        init_beta: float = 0.5,
    ) -> None:
        if not 0.0 <= init_beta <= 1.0:
            raise ConfigError(f"SCOP: init_beta must be in [0, 1], got {init_beta!r}")
        named = dict(model.named_modules())
        if layers is None:
            layers = [n for n, m in named.items() if isinstance(m, nn.Conv2d)]
        for n in layers:
            if not isinstance(named.get(n), nn.Conv2d):
                raise ConfigError(f"SCOP: {n!r} is not a Conv2d of {type(model).__name__}")
        if not layers:
            raise ConfigError(f"SCOP: {type(model).__name__} has no Conv2d to control")
        self.model = model
        self.knockoff = knockoff
        self.layers = list(layers)
        dev = next(model.parameters()).device
        self.beta: dict[str, nn.Parameter] = {
            n: nn.Parameter(torch.full((named[n].out_channels,), float(init_beta), device=dev))
            for n in self.layers
        }
        self._n: int | None = None
        self._handles = [named[n].register_forward_hook(self._mix_hook(n)) for n in self.layers]

    def _mix_hook(self, name: str) -> Callable[..., torch.Tensor | None]:
        def hook(_m: nn.Module, _a: Any, out: torch.Tensor) -> torch.Tensor | None:
            n = self._n
            if n is None:  # plain forward outside SCOP: no mixing
                return None
            b = self.beta[name].clamp(0.0, 1.0)[None, :, None, None]
            real = b * out[:n] + (1 - b) * out[n:]
            return torch.cat([real, out[n:]], 0)

        return hook

    def betas(self) -> list[nn.Parameter]:
        """The ``β`` parameters, one ``(C_out,)`` vector per controlled conv."""
        return list(self.beta.values())

    @torch.no_grad()
    def clamp_(self) -> None:
        """Project every ``β`` back onto [0, 1] (call after each optimizer step)."""
        for b in self.beta.values():
            b.clamp_(0.0, 1.0)

    def __call__(self, x: torch.Tensor, x_knockoff: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the real half ``(N, ...)`` for input ``x`` ``(N, ...)`` mixed with knockoffs
        ``x_knockoff`` (default: ``knockoff(N)`` sampled now)."""
        n = x.shape[0]
        if x_knockoff is None:
            with torch.no_grad():
                x_knockoff = self.knockoff(n).to(x.device, x.dtype)
        if x_knockoff.shape != x.shape:
            raise ConfigError(
                f"SCOP: knockoffs have shape {tuple(x_knockoff.shape)}, inputs {tuple(x.shape)}"
            )
        self._n = n
        try:
            out = self.model(torch.cat([x, x_knockoff], 0))
        finally:
            self._n = None
        return out[:n]

    def fit(self, loader: Iterable[Any], steps: int = 200, lr: float = 0.01) -> list[float]:
        """Learn the ``β`` on the cross-entropy of the real half with the network frozen (eval mode,
        ``requires_grad`` off, both restored afterwards). Returns the loss per step."""
        was_training = self.model.training
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        self.model.eval()
        opt = torch.optim.Adam(self.betas(), lr=lr)
        losses: list[float] = []
        try:
            while len(losses) < steps:
                for x, y in loader:
                    loss = F.cross_entropy(self(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    self.clamp_()
                    losses.append(float(loss.detach()))
                    if len(losses) >= steps:
                        break
                if not losses:
                    raise ConfigError("SCOP.fit: the loader yielded no batch")
        finally:
            for p, f in flags:
                p.requires_grad_(f)
            self.model.train(was_training)
        return losses

    def group_scores(self, group: Group, model: nn.Module) -> np.ndarray | None:  # type: ignore[override]
        """Per-unit ``|γ_BN| · (2β - 1)`` of a channel group, shape ``(n_units,)`` float64 (``β`` averaged
        over the controlled convs producing it, ``|γ|`` over its norm layers,
        :class:`~secateur.criteria.group.BNScaleCriterion`; without a norm layer the score is ``2β - 1``);
        ``None`` if no controlled conv produces the group."""
        bets = []
        for m in group.members:
            if m.dim == 0 and not m.is_buffer and m.name.endswith(".weight") and m.module in self.beta:
                b = self.beta[m.module].detach().clamp(0, 1).double().cpu().numpy()
                bets.append(unit_mean(b, m, group.n_units))
        if not bets:
            return None
        contrast = 2.0 * np.mean(bets, axis=0) - 1.0
        gamma = BNScaleCriterion(missing="skip").group_scores(group, model)
        return contrast if gamma is None else gamma * contrast

    def detach(self) -> None:
        """Remove the mixing hooks; the model is the plain network again (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def prune(
        self,
        example_inputs: Any,
        sparsity: float,
        allocation: str = "global",
        protect: Sequence[str] = (),
        verify: bool = True,
    ) -> tuple[nn.Module, dict]:
        """Detach the hooks and remove the ``sparsity`` lowest-scoring filters through the structured driver
        (:func:`secateur.methods.slimming.prune_scored`).

        Args:
            sparsity: fraction in [0, 1) of the controlled groups' channels: ranked over all of them at once
                (``allocation="global"``, raw scores) or the same fraction of each group (``"uniform"``).
            protect: module name patterns never pruned. verify: the oracle inside the transaction.

        Returns ``(model, plan)``. Raises as :func:`~secateur.methods.slimming.prune_scored`.
        """
        self.detach()
        return prune_scored(self.model, example_inputs, self, sparsity, allocation, protect, verify)
