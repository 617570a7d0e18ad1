"""Distributed data-parallel fine-tuning with pruning masks (``torchrun`` + ``DistributedDataParallel``).

How masks stay identical on every rank:

1. The pruner attaches its masks (parametrizations, with ``bool`` buffers) *before* the model is
   wrapped, so DDP registers the final set of parameters (``...parametrizations.weight.original``)
   and broadcasts rank 0's parameters and buffers (masks included) at construction.
2. Gradients are all-reduced (averaged), so every rank holds the same weights after each step.
   Schedules are pure functions of the step count, so every rank updates its masks at the same
   steps, from the same weights: deterministic criteria produce the same masks everywhere.
3. We do not rely on (2) alone: :class:`DistributedPruningCallback` (or :func:`sync_masks` in your
   own loop) broadcasts the masks from rank 0 after each update (which also covers criteria with
   randomness, such as ``"random"``) and then checks, with one all-gather of a SHA-256 digest,
   that every rank holds the same masks; :func:`assert_masks_equal_across_ranks` raises otherwise.

Sharding: :class:`ShardedLoader` splits each *global* batch of a loader (such as
:class:`secateur.data.TensorLoader`, whose shuffle is a pure function of seed and epoch) into
``world_size`` equal contiguous shards. With a mean-reduced loss, DDP's gradient average over the
shards equals the single-process gradient of the global batch, so a 2-rank run reproduces the
1-process run with the same global batch size up to float rounding.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from secateur.errors import ConfigError, SecateurError

__all__ = [
    "DistributedPruningCallback",
    "MaskMismatchError",
    "ShardedLoader",
    "assert_masks_equal_across_ranks",
    "broadcast_masks",
    "init_distributed",
    "is_main_process",
    "mask_digest",
    "sync_masks",
    "unwrap",
    "wrap_ddp",
]


class MaskMismatchError(SecateurError):
    """Ranks hold different pruning masks (a non-deterministic criterion without broadcasting)."""


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _require_dist(what: str) -> None:
    if not _dist_ready():
        raise ConfigError(f"{what} needs an initialised process group (call init_distributed() first)")


def init_distributed(backend: str | None = None) -> tuple[int, int, torch.device]:
    """Initialise the default process group from the ``torchrun`` environment variables.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` (set by
    ``torchrun``). ``backend`` defaults to ``"nccl"`` when CUDA is available, else ``"gloo"``. On
    NCCL the current CUDA device is set to ``cuda:LOCAL_RANK``. Idempotent.

    Returns:
        ``(rank, world_size, device)`` where ``device`` is ``cuda:LOCAL_RANK`` for NCCL, else CPU.

    Raises:
        ConfigError: the environment lacks ``RANK``/``WORLD_SIZE`` (not launched by torchrun).
    """
    use_cuda = torch.cuda.is_available() and backend in (None, "nccl")
    backend = backend or ("nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if backend == "nccl" else torch.device("cpu")
    if not _dist_ready():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ConfigError(f"init_distributed: environment lacks {missing}; launch with torchrun")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), device


def is_main_process() -> bool:
    """True on rank 0, and in a run without an initialised process group."""
    return not _dist_ready() or dist.get_rank() == 0


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (or ``model`` itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _masked(obj: Any) -> list[tuple[str, nn.Module, str]]:
    """``(path, module, param_name)`` of each masked parameter, in a rank-independent order."""
    from secateur.masks import masked_parameters

    if hasattr(obj, "targets") and hasattr(obj, "model"):  # a Pruner
        return [(t.name, t.module, t.param_name) for t in obj.targets]
    return sorted(
        ((f"{p}.{n}" if p else n), m, n) for p, m, n in masked_parameters(unwrap(obj))
    )


def mask_digest(pruner_or_model: Any) -> str:
    """SHA-256 hex digest of every mask (names, shapes and bits), in a fixed order.

    Accepts a :class:`secateur.Pruner`, a model (plain or DDP-wrapped) with masks attached.
    """
    from secateur.masks import get_mask

    h = hashlib.sha256()
    for name, module, pname in _masked(pruner_or_model):
        mask = get_mask(module, pname)
        h.update(name.encode())
        h.update(str(tuple(mask.shape)).encode())
        h.update(mask.detach().to("cpu", torch.uint8).contiguous().numpy().tobytes())
    return h.hexdigest()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def assert_masks_equal_across_ranks(pruner_or_model: Any) -> str:
    """Check that every rank holds the same masks (all-gathers a SHA-256 digest: 32 bytes per rank).

    A collective: every rank must call it. Without an initialised process group it just returns
    the local digest.

    Returns:
        The digest (identical on all ranks).

    Raises:
        MaskMismatchError: some rank's masks differ from rank 0's; the message lists the ranks.
    """
    digest = mask_digest(pruner_or_model)
    if not _dist_ready() or dist.get_world_size() == 1:
        return digest
    dev = _collective_device()
    local = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8, device=dev)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    digests = [bytes(t.cpu().tolist()).hex() for t in gathered]
    bad = [r for r, d in enumerate(digests) if d != digests[0]]
    if bad:
        raise MaskMismatchError(
            f"pruning masks differ across ranks: ranks {bad} disagree with rank 0 "
            f"(rank 0 digest {digests[0][:12]}...). Use a deterministic criterion or broadcast_masks()."
        )
    return digest


@torch.no_grad()
def broadcast_masks(pruner_or_model: Any, src: int = 0) -> None:
    """Copy rank ``src``'s masks to every rank (and zero the stored weights they remove).

    A collective: every rank must call it. A no-op without an initialised process group.
    """
    if not _dist_ready() or dist.get_world_size() == 1:
        return
    from secateur.masks import get_mask, set_mask

    dev = _collective_device()
    for _, module, pname in _masked(pruner_or_model):
        mask = get_mask(module, pname)
        buf = mask.to(dev, torch.uint8).contiguous()  # gloo/NCCL have no bool broadcast everywhere
        dist.broadcast(buf, src=src)
        set_mask(module, buf.bool(), pname)


def sync_masks(pruner_or_model: Any, *, broadcast: bool = True, check: bool = True) -> str | None:
    """After a mask update: optionally broadcast from rank 0, then optionally verify equality.

    Returns the mask digest when ``check`` is set, else None. Raises :class:`MaskMismatchError`.
    """
    if broadcast:
        broadcast_masks(pruner_or_model)
    return assert_masks_equal_across_ranks(pruner_or_model) if check else None


def wrap_ddp(
    model: nn.Module,
    pruner: Any = None,
    *,
    device: torch.device | str | None = None,
    **ddp_kwargs: Any,
) -> nn.Module:
    """Wrap ``model`` in ``DistributedDataParallel`` after its masks are attached.

    Create the :class:`secateur.Pruner` (which attaches the masks) *before* calling this, so DDP
    sees the final parameters. If ``pruner`` is given, masks are synchronised from rank 0 and
    checked first. On CUDA devices ``device_ids`` defaults to ``[device]``. Extra keyword
    arguments go to ``DistributedDataParallel`` (default ``broadcast_buffers=True`` keeps the mask
    buffers of rank 0 authoritative at every forward).

    Returns:
        The DDP-wrapped model (the pruner keeps working on the same module objects).

    Raises:
        ConfigError: no initialised process group.
        MaskMismatchError: masks still differ after broadcasting (should not happen).
    """
    _require_dist("wrap_ddp")
    dev = torch.device(device) if device is not None else next(
        (p.device for p in model.parameters()), torch.device("cpu")
    )
    model = model.to(dev)
    if pruner is not None:
        sync_masks(pruner)
    if dev.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [dev])
        ddp_kwargs.setdefault("output_device", dev)
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


class DistributedPruningCallback:
    """A :class:`secateur.train.Trainer` callback that drives a pruner under DDP.

    It forwards ``on_after_backward`` and ``extra_loss`` to the pruner when it has them. On
    ``on_train_begin`` and ``on_step_end`` it calls ``pruner.step(trainer.global_step)``; when
    the masks changed it calls :func:`sync_masks` (broadcast from rank 0 if ``broadcast``, then a
    digest check if ``check``). Use it *instead of* passing the pruner itself as a callback.
    ``digests`` records ``(step, digest)`` of each checked update. Saves/loads the pruner's state.

    Raises:
        MaskMismatchError: from the check, if ranks diverge.
    """

    def __init__(self, pruner: Any, *, broadcast: bool = True, check: bool = True) -> None:
        self.pruner = pruner
        self.broadcast = broadcast
        self.check = check
        self.digests: list[tuple[int, str]] = []

    def _step(self, step: int) -> None:
        if self.pruner.step(step):
            digest = sync_masks(self.pruner, broadcast=self.broadcast, check=self.check)
            if digest is not None:
                self.digests.append((step, digest))

    def on_train_begin(self, trainer: Any) -> None:
        self._step(int(trainer.global_step))

    def on_after_backward(self, trainer: Any) -> None:
        """Forward to the pruner (e.g. Taylor statistics of a ChannelPruner): under DDP the gradients are
        already averaged across ranks here, so every rank accumulates the same statistics."""
        fn = getattr(self.pruner, "on_after_backward", None)
        if fn is not None:
            fn(trainer)

    def extra_loss(self, trainer: Any) -> Any:
        """Forward the pruner's loss term (ADMM, movement, FBS penalties), if it has one."""
        fn = getattr(self.pruner, "extra_loss", None)
        return fn(trainer) if fn is not None else None

    def on_step_end(self, trainer: Any) -> None:
        self._step(int(trainer.global_step))

    def state_dict(self) -> dict[str, Any]:
        return self.pruner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pruner.load_state_dict(state)


class ShardedLoader:
    """Give this rank its shard of every global batch of ``loader``.

    Each batch (a tensor, or a tuple/list of tensors sharing the leading dimension) is split into
    ``world_size`` contiguous shards and shard ``rank`` is yielded. Every rank iterates the same
    global batches (so ``loader`` must yield the same sequence on every rank, as a
    :class:`secateur.data.TensorLoader` with the same seed does), and the number of batches per
    epoch is the same everywhere. A final global batch smaller than ``world_size`` is skipped on
    all ranks; one not divisible by ``world_size`` gives shards differing by one example (the
    gradient average is then not exactly the global mean: use ``drop_last=True`` to avoid it).
    ``set_epoch``, ``state_dict`` and ``load_state_dict`` are forwarded to ``loader``.

    Args:
        loader: an iterable of global batches with ``__len__`` and a ``batch_size`` attribute.
        rank, world_size: default to the process group's; 0 and 1 without one.

    Raises:
        ConfigError: ``loader.batch_size`` is not divisible by ``world_size``, or bad rank/world size.
    """

    def __init__(self, loader: Any, rank: int | None = None, world_size: int | None = None) -> None:
        if rank is None:
            rank = dist.get_rank() if _dist_ready() else 0
        if world_size is None:
            world_size = dist.get_world_size() if _dist_ready() else 1
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(
                f"ShardedLoader: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        bs = getattr(loader, "batch_size", None)
        if isinstance(bs, int) and bs % world_size:
            raise ConfigError(
                f"ShardedLoader: global batch size {bs} is not divisible by world_size {world_size}"
            )
        self.loader = loader
        self.rank = rank
        self.world_size = world_size

    @property
    def batch_size(self) -> int | None:
        """Examples per shard (global batch size // world_size), or None if unknown."""
        bs = getattr(self.loader, "batch_size", None)
        return bs // self.world_size if isinstance(bs, int) else None

    def _last_batch_too_small(self) -> bool:
        n = getattr(self.loader, "num_examples", None)
        bs = getattr(self.loader, "batch_size", None)
        if not isinstance(n, int) or not isinstance(bs, int) or getattr(self.loader, "drop_last", False):
            return False
        rem = n % bs
        return 0 < rem < self.world_size

    def __len__(self) -> int:
        return len(self.loader) - int(self._last_batch_too_small())

    def _shard(self, t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            return torch.tensor_split(t, self.world_size)[self.rank]
        if isinstance(t, (tuple, list)):
            return type(t)(self._shard(v) for v in t)
        if isinstance(t, dict):
            return {k: self._shard(v) for k, v in t.items()}
        return t

    def _size(self, batch: Any) -> int:
        if isinstance(batch, torch.Tensor):
            return int(batch.shape[0])
        items = batch.values() if isinstance(batch, dict) else batch
        for v in items:
            if isinstance(v, torch.Tensor):
                return int(v.shape[0])
        raise ConfigError("ShardedLoader: a batch holds no tensor to shard")

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            if self._size(batch) < self.world_size:
                continue
            yield self._shard(batch)

    def set_epoch(self, epoch: int) -> None:
        if callable(getattr(self.loader, "set_epoch", None)):
            self.loader.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict() if callable(getattr(self.loader, "state_dict", None)) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if callable(getattr(self.loader, "load_state_dict", None)):
            self.loader.load_state_dict(state)
