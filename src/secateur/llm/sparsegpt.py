"""SparseGPT: one-shot pruning with OBS weight reconstruction (Frantar & Alistarh 2023).

"SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", Algorithm 1. For a
Linear layer ``W (rows, cols)`` with calibration inputs ``X (cols, tokens)`` the layer-wise problem
``min ||W X - W_hat X||^2`` has Hessian ``H = 2 X X^T``. Columns are processed left to right; when
column ``j`` is fixed, the error of its pruned entries is spread over the not-yet-processed columns
with the Optimal Brain Surgeon update ``delta = -(w_j - q_j) / [H_F^-1]_jj * [H_F^-1]_{j, F}``.
The sequence of inverses ``H_F^-1`` (F = remaining columns) is read off the upper Cholesky factor
``U`` of ``H^-1``: row ``j`` of ``U`` is row ``j`` of ``H_F^-1`` divided by ``sqrt([H_F^-1]_jj)``
(section 3.2, "Step 3"), which is why the update divides by ``U_jj`` and uses ``U_{j, F}``.

Details from the paper kept here: dampening ``lambda = 1%`` of the mean diagonal of ``H``
(section 3.2); columns in blocks of ``B = 128`` with the error of a block applied to the rest of
the matrix in one lazy batch update (section 3.2, "Lazy batch updates"); adaptive mask selection
per block of ``B_s = 128`` columns by the OBS saliency ``w^2 / [H_F^-1]_jj = (w / U_jj)^2`` using
the weights as already updated (section 3.3); N:M by choosing, every M columns, the ``M - N``
lowest saliencies of each row in that group (section 3.4). Inputs that are always zero (``H_jj = 0``)
carry no signal; their weights are zeroed when pruning and their diagonal set to 1 (as the paper's
reference code does) so that ``H`` stays invertible.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from secateur._validate import check_sparsity
from secateur.errors import ConfigError, SecateurError
from secateur.masks.patterns import Pattern, parse_pattern


def _inverse_cholesky_upper(h: torch.Tensor, damp: float, layer: str) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + lambda I)^-1``; retries with 10x dampening twice."""
    mean_diag = torch.diag(h).mean()
    lam = damp
    for _ in range(3):
        hd = h.clone()
        hd.diagonal().add_(lam * mean_diag)
        l_fac, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(l_fac)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return u
        lam *= 10.0
    raise SecateurError(f"{layer or 'layer'}: Hessian not positive definite even with dampening {lam / 10:g}")


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device, enabled: bool) -> Iterator[None]:
    """Run the enclosed ops on one intra-op thread if ``enabled`` and ``device`` is the CPU."""
    if not enabled or device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | None = None,
    pattern: str | tuple[int, int] | Pattern = "layer",
    block_size: int = 128,
    damp: float = 0.01,
    layer: str = "",
    deterministic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` and reconstruct the survivors (SparseGPT, Algorithm 1).

    Args:
        weight: ``(rows, cols)`` = ``(out_features, in_features)``; not modified.
        hessian: ``(cols, cols)``, ``2 X X^T`` (any positive scale) from
            :meth:`secateur.llm.calibration.InputStats.hessian`.
        sparsity: fraction in [0, 1) for unstructured; ignored for N:M (``1 - N/M``).
        pattern: ``"layer"``/``"row"``/``"unstructured"`` for unstructured sparsity with the
            paper's adaptive per-block mask selection (exactly ``floor(sparsity * rows * cols)``
            weights pruned in the layer, distributed over column blocks by cumulative count, so
            rows may differ), or ``"N:M"``/``(N, M)`` (exactly N kept of every M per row).
        block_size: columns per lazy-update block and per mask-selection block (paper: 128).
        damp: dampening as a fraction of the mean diagonal of ``H`` (paper: 0.01).
        deterministic: on CPU, run all of the linear algebra on one thread (the default), so the
            result does not depend on ``torch.get_num_threads()``; ``False`` lets the inverse
            Cholesky factorisation and large lazy updates use every thread (faster on many cores).

    Determinism: on CPU with ``deterministic=True`` the output is a function of the bits of
    ``weight`` and ``hessian`` only, for a given torch/MKL build and CPU instruction set: it is
    the same at any thread count (tested at 1 and 2 threads). This costs little here: on the
    2-core CPU machine the 4096 x 4096 inverse Cholesky factor took 2.0-2.4 s on one thread and
    4.6-8.9 s on two busy ones. With ``deterministic=False``, 1 and 2 threads gave factors that
    differ in the last bits, and reconstructed weights that differ by up to ~3e-6 of the largest
    weight (384 x 1536 and 1536 x 384 layers), which can flip near-tie mask choices. The Hessian
    is a float32 sum (:class:`~secateur.llm.calibration.InputStats`): another batching or order
    of the same calibration tokens changes its last bits, and with them a few near-tie decisions
    (12 of the 2:4 choices of two MiniLM layers, on another CPU); compare results of two
    summation orders by their properties, not bit for bit. On GPU nothing is forced: cuSOLVER
    and cuBLAS decide.

    Returns:
        ``(new_weight, keep)``: updated weights (``weight.dtype``, exact zeros where pruned) and
        the bool keep-mask, both ``(rows, cols)``. With nothing to prune, ``new_weight`` equals
        ``weight`` exactly.

    Raises:
        ConfigError: bad sparsity/pattern, shapes that do not fit, ``cols % M != 0`` or
            ``block_size % M != 0`` for N:M, or a block pattern (not supported here).
        SecateurError: ``H`` cannot be made positive definite.
    """
    name = layer or "layer"
    p = parse_pattern(pattern)
    if p.kind == "block":
        raise ConfigError(f"{name}: SparseGPT supports unstructured and N:M patterns, not {p}")
    if weight.dim() != 2:
        raise ConfigError(f"{name}: SparseGPT needs a 2-D weight, got {tuple(weight.shape)}")
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ConfigError(f"{name}: Hessian {tuple(hessian.shape)} does not fit weight {tuple(weight.shape)}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ConfigError(f"{name}: block_size must be a positive int, got {block_size!r}")
    if not damp > 0:
        raise ConfigError(f"{name}: damp must be > 0, got {damp!r}")
    if p.kind == "nm":
        n, m = p.nm
        if cols % m:
            raise ConfigError(f"{name}: in_features ({cols}) is not divisible by M={m} for {n}:{m} sparsity")
        if block_size % m:
            raise ConfigError(f"{name}: block_size ({block_size}) must be a multiple of M={m}")
        sp = 1.0 - n / m
    else:
        if sparsity is None:
            raise ConfigError(f"{name}: unstructured SparseGPT needs a sparsity")
        sp = check_sparsity(sparsity, f"sparsity of {name}")
        n = m = 0

    if sp == 0.0:
        return weight.detach().clone(), torch.ones(rows, cols, dtype=torch.bool, device=weight.device)

    # A fresh row-major copy: ``weight`` may be a transposed view (GPT-2 Conv1D).
    w = weight.detach().float().clone(memory_format=torch.contiguous_format)
    h = hessian.detach().clone().float().to(w.device)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    # One thread makes MKL's factorisation independent of the thread count (``deterministic``).
    with _one_cpu_thread(w.device, deterministic):
        u = _inverse_cholesky_upper(h, damp, layer)
    prune = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    # The column loop issues thousands of tiny ops: with several threads their synchronisation
    # dominates (measured on a 2-core machine: a 384 x 384 layer took 0.1 s on 1 thread and 0.3-6 s
    # on 2 busy threads), so only large steps (rows * block_size above 2**21) may use every thread.
    with _one_cpu_thread(w.device, deterministic or rows * block_size <= 2**21):
        _sparsegpt_columns(w, u, prune, sp, p, n, m, block_size)
    keep = ~prune
    w[prune] = 0.0
    return w.to(weight.dtype), keep


def _sparsegpt_columns(
    w: torch.Tensor,
    u: torch.Tensor,
    prune: torch.Tensor,
    sp: float,
    p: Pattern,
    n: int,
    m: int,
    block_size: int,
) -> None:
    """Algorithm 1's loop over column blocks, in place on ``w`` (weights) and ``prune`` (bool)."""
    rows, cols = w.shape
    u_diag = torch.diag(u)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        d1 = u_diag[i1:i2]
        p1 = torch.zeros(w1.shape, dtype=torch.bool, device=w1.device)
        if p.kind != "nm":
            # Adaptive mask for this block: the k lowest OBS saliencies, k from the cumulative count
            # so the whole layer prunes exactly floor(sp * rows * cols).
            k = math.floor(sp * rows * i2) - math.floor(sp * rows * i1)
            if k > 0:
                sal = (w1 / d1.unsqueeze(0)) ** 2
                idx = torch.sort(sal.flatten(), stable=True).indices[:k]
                p1.view(-1)[idx] = True
        for i in range(count):
            if p.kind == "nm" and i % m == 0:
                sal = (w1[:, i : i + m] / d1[i : i + m].unsqueeze(0)) ** 2
                idx = torch.sort(sal, dim=1, stable=True).indices[:, : m - n]
                p1[:, i : i + m].scatter_(1, idx, True)
            col = w1[:, i]
            q = col.clone()
            q[p1[:, i]] = 0.0
            q1[:, i] = q
            e = (col - q) / d1[i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i1:i2] = q1
        prune[:, i1:i2] = p1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
