"""One-shot pruning of transformers, layer by layer: magnitude, Wanda and SparseGPT.

``calibration``: tokenised calibration batches and running input statistics;
``wanda`` / ``sparsegpt``: the per-layer algorithms; ``oneshot``: the block-by-block driver;
``text``: real English text (Debian fortunes) and sentence-embedding quality measures.
"""

from secateur.llm.calibration import InputStats, tokenized_batches
from secateur.llm.oneshot import (
    METHODS,
    LayerResult,
    OneShotReport,
    collect_linear_inputs,
    find_blocks,
    prune_linear,
    prune_oneshot,
    reconstruction_error,
)
from secateur.llm.sparsegpt import sparsegpt_prune
from secateur.llm.text import (
    FortuneSplit,
    load_fortunes,
    mean_cosine,
    retrieval_agreement,
    sentence_embeddings,
)
from secateur.llm.wanda import wanda_mask, wanda_scores

__all__ = [
    "METHODS",
    "FortuneSplit",
    "InputStats",
    "LayerResult",
    "OneShotReport",
    "collect_linear_inputs",
    "find_blocks",
    "load_fortunes",
    "mean_cosine",
    "prune_linear",
    "prune_oneshot",
    "reconstruction_error",
    "retrieval_agreement",
    "sentence_embeddings",
    "sparsegpt_prune",
    "tokenized_batches",
    "wanda_mask",
    "wanda_scores",
]
