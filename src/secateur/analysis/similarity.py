"""Similarity of two networks (dense vs pruned, two seeds) from activations and from gradients.

- Linear CKA (Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited", ICML,
  eq. 5 and sec. 4): for representations ``X (n, p1)`` and ``Y (n, p2)`` of the same ``n`` inputs,
  ``CKA = ||Y_cᵀ X_c||_F² / (||X_cᵀ X_c||_F ||Y_cᵀ Y_c||_F)`` with column-centred ``X_c, Y_c``. It is
  invariant to orthogonal transforms and isotropic scaling of either side, and needs no equal widths.
  Computed here from Gram matrices (``K = X Xᵀ``): ``HSIC(K, L) = tr(K H L H)``, which also serves
  kernels that are not built from explicit features.
- Gradient similarity (Tang et al. 2020, "Similarity of Neural Networks with Gradients",
  arXiv:2003.11498, sec. 3): each input is represented by the gradient of the loss with respect to
  the network's parameters, ``φ(x) = ∇_θ L(f(x; θ), y)``, so two networks are compared through the
  kernels ``K_ij = <φ_a(x_i), φ_a(x_j)>`` and ``L_ij = <φ_b(x_i), φ_b(x_j)>`` with the CKA index. The
  kernel is accumulated parameter by parameter, so networks of different sizes (a pruned one) compare
  directly; the paper's sketching (random projections) is not needed at these sizes and is omitted.

Every function returns a float in [0, 1] (1 for a network compared with itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from secateur.errors import ConfigError

__all__ = [
    "activation_gram",
    "cka",
    "gradient_gram",
    "layer_cka",
    "linear_cka",
    "network_similarity",
    "similarity_report",
]


def _center(k: torch.Tensor) -> torch.Tensor:
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def cka(k: torch.Tensor, l: torch.Tensor) -> float:
    """CKA of two Gram matrices ``(n, n)``: ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` (Kornblith et
    al. 2019, eq. 4; the 1/(n-1)² factors cancel). Returns 0.0 when either kernel is constant.

    Raises:
        ConfigError: shapes that are not the same square ``(n, n)`` with ``n >= 2``.
    """
    if k.dim() != 2 or k.shape[0] != k.shape[1] or k.shape != l.shape or k.shape[0] < 2:
        raise ConfigError(
            f"cka needs two Gram matrices of one shape (n, n), n >= 2; got {k.shape}, {l.shape}"
        )
    kc, lc = _center(k.double()), _center(l.double())
    hkl = (kc * lc).sum()
    den = torch.sqrt((kc * kc).sum() * (lc * lc).sum())
    if float(den) <= 0.0:
        return 0.0
    return float((hkl / den).clamp(0.0, 1.0))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations ``x (n, p1)`` and ``y (n, p2)`` of the same ``n`` examples
    (extra dimensions are flattened: ``(n, C, H, W) -> (n, C·H·W)``). Kornblith et al. 2019, eq. 5.

    Raises:
        ConfigError: different numbers of examples or fewer than 2.
    """
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"linear_cka: {x.shape[0]} and {y.shape[0]} examples differ")
    xf = x.detach().reshape(x.shape[0], -1).double()
    yf = y.detach().reshape(y.shape[0], -1).double()
    return cka(xf @ xf.T, yf @ yf.T)


def _capture(model: nn.Module, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    handles = []
    named = dict(model.named_modules())
    for name in layers:
        if name not in named:
            raise ConfigError(f"{type(model).__name__} has no module {name!r}")

        def hook(_m: nn.Module, _a: Any, o: Any, name: str = name) -> None:
            out[name] = (o[0] if isinstance(o, (tuple, list)) else o).detach()

        handles.append(named[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    out[""] = logits.detach()
    return out


def activation_gram(model: nn.Module, x: torch.Tensor, layer: str = "") -> torch.Tensor:
    """Gram matrix ``(n, n)`` of the activations of ``layer`` (module path; ``""`` = the output) on ``x``."""
    a = _capture(model, x, [layer] if layer else [])[layer]
    a = a.reshape(a.shape[0], -1).double()
    return a @ a.T


def layer_cka(
    model_a: nn.Module, model_b: nn.Module, x: torch.Tensor, layers_a: Sequence[str], layers_b: Sequence[str]
) -> torch.Tensor:
    """Linear CKA between every layer of ``layers_a`` (model a) and of ``layers_b`` (model b) on the same
    inputs ``x``; returns a ``(len(layers_a), len(layers_b))`` float64 tensor.

    Raises:
        ConfigError: a layer name the model does not have.
    """
    fa = _capture(model_a, x, layers_a)
    fb = _capture(model_b, x, layers_b)
    out = torch.zeros(len(layers_a), len(layers_b), dtype=torch.float64)
    for i, la in enumerate(layers_a):
        for j, lb in enumerate(layers_b):
            out[i, j] = linear_cka(fa[la], fb[lb])
    return out


def gradient_gram(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, params: Sequence[str] | None = None
) -> torch.Tensor:
    """Kernel ``K_ij = <∇_θ L(x_i), ∇_θ L(x_j)>`` ``(n, n)`` of per-example loss gradients (Tang et al.
    2020, sec. 3): cross-entropy against ``y`` ``(n,)``, or against the model's own prediction when
    ``y`` is None. ``params``: parameter names to use (default every trainable one). Gradients already
    stored on the parameters are preserved; the mode is left as it was (call ``eval()`` first to
    freeze BatchNorm statistics).

    Raises:
        ConfigError: ``params`` naming a parameter the model does not have, or none trainable.
    """
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if params is not None:
        missing = [p for p in params if p not in named]
        if missing:
            raise ConfigError(f"{type(model).__name__} has no trainable parameters {missing}")
        named = {n: named[n] for n in params}
    if not named:
        raise ConfigError(f"{type(model).__name__} has no trainable parameter for gradient similarity")
    plist = list(named.values())
    if y is None:
        with torch.no_grad():
            y = model(x).argmax(1)
    rows = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, plist, allow_unused=True)
        rows.append(torch.cat([g.detach().double().flatten() for g in grads if g is not None]))
    g = torch.stack(rows)
    return g @ g.T


def network_similarity(
    model_a: nn.Module,
    model_b: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    kind: str = "gradient",
    layer_a: str = "",
    layer_b: str = "",
) -> float:
    """Similarity in [0, 1] of two networks on inputs ``x`` ``(n, ...)``, ``n >= 2``.

    ``kind="gradient"``: CKA of the per-example loss-gradient kernels (Tang et al. 2020);
    ``kind="activation"``: linear CKA of the activations of ``layer_a`` / ``layer_b`` (default: the
    outputs; Kornblith et al. 2019). Both models are evaluated as they are (set ``eval()`` first).

    Raises:
        ConfigError: unknown kind, a missing layer, fewer than 2 examples.
    """
    if kind == "gradient":
        return cka(gradient_gram(model_a, x, y), gradient_gram(model_b, x, y))
    if kind == "activation":
        return cka(activation_gram(model_a, x, layer_a), activation_gram(model_b, x, layer_b))
    raise ConfigError(f"kind must be 'gradient' or 'activation', got {kind!r}")


def similarity_report(
    model_a: nn.Module, model_b: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None
) -> dict[str, float]:
    """``{"gradient_cka": ..., "activation_cka": ...}`` of two networks on the same batch, for reports."""
    return {
        "gradient_cka": network_similarity(model_a, model_b, x, y, "gradient"),
        "activation_cka": network_similarity(model_a, model_b, x, y, "activation"),
    }
