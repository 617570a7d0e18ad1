"""Training utilities: a small trainer with callbacks, exact resume and pickle-free checkpoints."""

from secateur.train.bn import recalibrate_bn
from secateur.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_weights,
    read_state,
    save_checkpoint,
    verify_checkpoint,
)
from secateur.train.distill import Distillation, kd_loss
from secateur.train.rebind import compact_in_training, rebind_optimizer, renew_parameters
from secateur.train.seed import get_rng_state, seed_everything, set_rng_state
from secateur.train.trainer import OPTIMIZERS, SCHEDULES, Trainer, lr_at_step

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "Distillation",
    "Trainer",
    "compact_in_training",
    "get_rng_state",
    "kd_loss",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_weights",
    "lr_at_step",
    "read_state",
    "rebind_optimizer",
    "recalibrate_bn",
    "renew_parameters",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
    "verify_checkpoint",
]
