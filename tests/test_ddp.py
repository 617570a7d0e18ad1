"""DDP: a 2-process gloo run under torchrun equals the 1-process run with the same global batch.

Run as a script (``torchrun --nproc_per_node 2 tests/test_ddp.py OUT_DIR``) this file is the worker;
under pytest, ``test_two_process_matches_single_process`` launches it and compares.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from secateur.data import TensorLoader
from secateur.errors import ConfigError
from secateur.pruners.element import Pruner
from secateur.schedules import Iterative
from secateur.train import Trainer
from secateur.train.ddp import (
    DistributedPruningCallback,
    ShardedLoader,
    assert_masks_equal_across_ranks,
    mask_digest,
    wrap_ddp,
)

GLOBAL_BATCH = 16
N_EXAMPLES = 64
EPOCHS = 2


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    # float64 (model too): the 2-rank gradient is the mean of two shard means, summed in another order
    # than the 1-process one; in float32 the weights would differ in the last bits and a near-tie in
    # magnitude pruning could flip a mask on some CPU. In float64 such a flip is out of reach.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_EXAMPLES, 12, generator=g, dtype=torch.float64)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4] > 0).long()
    return x, y


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 4))
    return net.double()


def _run(rank: int = 0, world_size: int = 1, use_ddp: bool = False) -> tuple[nn.Module, Pruner, list]:
    """A few SGD steps (momentum, weight decay) with magnitude pruning during training."""
    x, y = _data()
    model = _model()
    pruner = Pruner(model, Iterative(sparsity=0.6, steps=3, every=2, start=1), criterion="magnitude")
    loader = TensorLoader(x, y, batch_size=GLOBAL_BATCH, shuffle=True, seed=3)
    callback = DistributedPruningCallback(pruner)
    if use_ddp:
        loader = ShardedLoader(loader)
        model_for_training = wrap_ddp(model, pruner)
    else:
        model_for_training = model
    trainer = Trainer(
        model_for_training, loader, epochs=EPOCHS, lr=0.1, momentum=0.9, weight_decay=5e-4,
        lr_schedule="constant", callbacks=[callback], progress=False, log_every=0,
    )
    trainer.fit()
    return model, pruner, callback.digests


def _worker(out_dir: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from secateur.masks import get_mask
    from secateur.train.ddp import MaskMismatchError, broadcast_masks, init_distributed

    torch.set_num_threads(1)
    rank, world, _ = init_distributed("gloo")
    model, pruner, digests = _run(rank, world, use_ddp=True)
    final = assert_masks_equal_across_ranks(pruner)
    if rank == 0:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(Path(out_dir, "model.safetensors")))
    # A deliberate divergence on rank 1 must be caught on every rank, and a broadcast must heal it.
    caught = False
    if rank == 1:
        t = pruner.targets[0]
        m = get_mask(t.module, t.param_name).clone()
        m.view(-1)[0] = ~m.view(-1)[0]
        get_mask(t.module, t.param_name).copy_(m)
    try:
        assert_masks_equal_across_ranks(pruner)
    except MaskMismatchError:
        caught = True
    broadcast_masks(pruner)
    healed = assert_masks_equal_across_ranks(pruner) == final
    info = {"rank": rank, "world": world, "digests": digests, "final": final,
            "caught": caught, "healed": healed}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(info))
    # Free the DDP wrapper (kept alive by reference cycles through the trainer) while the process group
    # still exists: its reducer destroyed after destroy_process_group aborts the process at exit
    # ("terminate called without an active exception", seen once in CI).
    del model, pruner
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_two_process_matches_single_process(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", __file__, str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert infos[0]["world"] == 2
    assert infos[0]["digests"] == infos[1]["digests"] and len(infos[0]["digests"]) == 3
    assert all(i["caught"] and i["healed"] for i in infos)
    ddp_state = load_file(str(tmp_path / "model.safetensors"))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, pruner, digests = _run()
    finally:
        torch.set_num_threads(threads)
    ref = model.state_dict()
    assert set(ref) == set(ddp_state)
    assert [d for _, d in digests] == [d for _, d in infos[0]["digests"]]
    assert [s for s, _ in digests] == [1, 3, 5]
    for k, v in ref.items():
        if v.dtype == torch.bool:
            assert torch.equal(v, ddp_state[k]), f"mask {k} differs"
        else:
            torch.testing.assert_close(ddp_state[k], v, rtol=1e-9, atol=1e-12, msg=f"{k} differs")
    assert abs(pruner.sparsity() - 0.6) < 0.01


def test_sharded_loader_splits_global_batches() -> None:
    x, y = _data()
    base = TensorLoader(x, y, batch_size=GLOBAL_BATCH, shuffle=True, seed=3)
    shards = [ShardedLoader(TensorLoader(x, y, batch_size=GLOBAL_BATCH, shuffle=True, seed=3), r, 2)
              for r in (0, 1)]
    assert len(shards[0]) == len(base) == N_EXAMPLES // GLOBAL_BATCH
    assert shards[0].batch_size == GLOBAL_BATCH // 2
    for s in shards:
        s.set_epoch(1)
    base.set_epoch(1)
    for (gx, gy), (ax, ay), (bx, by) in zip(base, *shards):
        assert torch.equal(torch.cat([ax, bx]), gx) and torch.equal(torch.cat([ay, by]), gy)
    assert shards[0].state_dict() == {"epoch": 2, "seed": 3}


def test_sharded_loader_skips_too_small_last_batch() -> None:
    x, y = torch.randn(33, 3), torch.zeros(33, dtype=torch.long)
    loader = ShardedLoader(TensorLoader(x, y, batch_size=16), rank=1, world_size=2)
    assert len(loader) == 2 and len(list(loader)) == 2


def test_sharded_loader_rejects_bad_configs() -> None:
    x, y = _data()
    with pytest.raises(ConfigError, match="divisible"):
        ShardedLoader(TensorLoader(x, y, batch_size=15), rank=0, world_size=2)
    with pytest.raises(ConfigError, match="rank"):
        ShardedLoader(TensorLoader(x, y, batch_size=16), rank=2, world_size=2)


def test_digest_tracks_masks_and_works_without_process_group() -> None:
    model = _model()
    pruner = Pruner(model, 0.5)
    before = mask_digest(pruner)
    assert mask_digest(model) == before  # same masks found from the model
    pruner.step(0)
    after = assert_masks_equal_across_ranks(pruner)  # no process group: the local digest
    assert after != before and after == mask_digest(model)


def test_wrap_ddp_needs_process_group() -> None:
    with pytest.raises(ConfigError, match="process group"):
        wrap_ddp(_model())


if __name__ == "__main__":
    _worker(sys.argv[1])


def test_the_ddp_callback_forwards_backward_statistics_and_loss_terms():
    """Without forwarding, a Taylor ChannelPruner driven through DistributedPruningCallback never saw a
    gradient, and penalties (ADMM, movement, FBS) were dropped."""
    from secateur.train import Trainer
    from secateur.train.ddp import DistributedPruningCallback

    class Recorder:
        def __init__(self) -> None:
            self.grads: list[float] = []

        def step(self, step: int) -> bool:
            return False

        def on_after_backward(self, trainer) -> None:
            self.grads.append(float(trainer.model.weight.grad.abs().sum()))

        def extra_loss(self, trainer):
            return 100.0 * trainer.model.weight.pow(2).sum()

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    rec = Recorder()
    cb = DistributedPruningCallback(rec)
    t = Trainer(model, [(x, y)], epochs=2, lr=1e-9, callbacks=[cb], progress=False)
    t.fit()
    assert len(rec.grads) == 2
    # the penalty's gradient (200 w) dominates the cross-entropy's: it reached the backward pass
    ce_only = torch.nn.functional.cross_entropy(model(x), y)
    g = torch.autograd.grad(ce_only, model.weight)[0]
    assert rec.grads[-1] > float(g.abs().sum()) + 100.0 * float(model.weight.abs().sum())
