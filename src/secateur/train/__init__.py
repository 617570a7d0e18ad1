"""Training utilities: a small trainer with callbacks, exact resume and pickle-free checkpoints."""

from secateur.train.bn import recalibrate_bn
from secateur.train.checkpoint import load_checkpoint, load_model_weights, read_state, save_checkpoint
from secateur.train.seed import get_rng_state, seed_everything, set_rng_state
from secateur.train.trainer import OPTIMIZERS, SCHEDULES, Trainer, lr_at_step

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "Trainer",
    "get_rng_state",
    "load_checkpoint",
    "load_model_weights",
    "lr_at_step",
    "read_state",
    "recalibrate_bn",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
]
