"""One-shot pruning of transformers, layer by layer: magnitude, Wanda and SparseGPT.

``calibration``: tokenised calibration batches and running input statistics;
``wanda`` / ``sparsegpt``: the per-layer algorithms; ``oneshot``: the block-by-block driver;
``offload``: the same driver on a safetensors checkpoint streamed from disk one block at a time;
``text``: real English text (Debian fortunes) and sentence-embedding quality measures;
``structural``: LLM-Pruner-style removal of heads and MLP channels of decoder layers (a thin call of the
structured driver; its criteria ``"llm_pruner"`` and ``"wanda_sp"`` live in
:mod:`secateur.criteria.group.llm`); ``gqa``: query heads removed evenly per KV group (GQA/MQA);
``loadable``: whether a pruned Hugging Face model's own config describes it (``UnloadableConfigError``);
``moe``: expert removal in mixture-of-experts models (router-weighted activation saliency);
``owl``: OWL's outlier-weighted layer-wise sparsity (``allocation="owl"`` of the one-shot drivers);
``depth``: ShortGPT's removal of whole blocks by Block Influence;
``recovery``: recovery of a pruned model by distillation from its dense original (logits through chunked
LM heads, or sentence embeddings of encoders).
RIA (``method="ria"``) is the element criterion :mod:`secateur.criteria.element.ria`.
"""

from secateur.criteria.element.ria import relative_importance, ria_mask, ria_scores
from secateur.data.text import (
    FortuneSplit,
    load_fortunes,
    mean_cosine,
    retrieval_agreement,
    sentence_embeddings,
)
from secateur.llm.calibration import (
    InputStats,
    calibration_batches,
    causal_lm_data,
    causal_lm_loss,
    tokenized_batches,
)
from secateur.llm.depth import DepthReport, block_influence, prune_depth, remove_blocks
from secateur.llm.loadable import UnloadableConfigError
from secateur.llm.moe import (
    MoEBlock,
    expert_plan,
    expert_saliency,
    find_moe_blocks,
    mask_experts,
    remove_experts,
)
from secateur.llm.offload import CheckpointReport, prune_checkpoint
from secateur.llm.oneshot import (
    METHODS,
    LayerResult,
    OneShotReport,
    collect_linear_inputs,
    find_blocks,
    prune_linear,
    prune_linears,
    prune_oneshot,
    reconstruction_error,
)
from secateur.llm.owl import OWL, layer_outlier_ratio, outlier_ratio, owl_sparsities
from secateur.llm.recovery import (
    DistillReport,
    distill,
    distillation_kl,
    distillation_loss,
    embedding_cosine,
    mean_pooled,
    perplexity,
)
from secateur.llm.sparsegpt import sparsegpt_prune
from secateur.llm.structural import (
    LLMPrunerTaylor,
    WandaStructured,
    decoder_groups,
    decoder_layer_groups,
    parameter_counts,
    prune_decoder,
    structural_scores,
)
from secateur.llm.wanda import wanda_mask, wanda_scores

__all__ = [
    "METHODS",
    "OWL",
    "DepthReport",
    "DistillReport",
    "FortuneSplit",
    "InputStats",
    "LLMPrunerTaylor",
    "CheckpointReport",
    "LayerResult",
    "MoEBlock",
    "UnloadableConfigError",
    "WandaStructured",
    "calibration_batches",
    "causal_lm_data",
    "causal_lm_loss",
    "decoder_groups",
    "decoder_layer_groups",
    "distill",
    "distillation_kl",
    "distillation_loss",
    "embedding_cosine",
    "mean_pooled",
    "expert_plan",
    "expert_saliency",
    "find_moe_blocks",
    "mask_experts",
    "parameter_counts",
    "prune_decoder",
    "remove_experts",
    "structural_scores",
    "OneShotReport",
    "collect_linear_inputs",
    "find_blocks",
    "load_fortunes",
    "mean_cosine",
    "prune_checkpoint",
    "prune_linears",
    "prune_linear",
    "prune_oneshot",
    "reconstruction_error",
    "retrieval_agreement",
    "sentence_embeddings",
    "sparsegpt_prune",
    "tokenized_batches",
    "wanda_mask",
    "wanda_scores",
    "block_influence",
    "layer_outlier_ratio",
    "outlier_ratio",
    "perplexity",
    "owl_sparsities",
    "prune_depth",
    "relative_importance",
    "remove_blocks",
    "ria_mask",
    "ria_scores",
]
