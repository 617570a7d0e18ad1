"""Family-specific Hugging Face config writers: what a family's ``config.json`` can express after pruning.

:func:`secateur.compact.plan.make_plan` proposes new values for the config keys every family shares
(:data:`~secateur.compact.plan.CONFIG_HEAD_KEYS`, ``CONFIG_FF_KEYS``, ...). How a family's modeling code reads
them differs, and decides whether plain ``transformers`` ``from_pretrained`` can rebuild the pruned model
(checked in transformers 5.25's modeling code):

- **head size from the hidden size**: BERT, RoBERTa, XLM-R, ELECTRA, ALBERT, DistilBERT, DeBERTa-v2, GPT-2,
  OPT, GPT-NeoX, GPT-J, StableLM, Bloom, MPT, Falcon, BART/mBART/Marian/Pegasus, Whisper compute
  ``head size = hidden_size / num_attention_heads`` (no ``head_dim`` key is read). Pruned
  heads are expressible only when the hidden size shrinks in the same proportion (e.g. ``prune_normalized
  =True`` with 4 -> 3 heads and hidden 32 -> 24); otherwise the config field at fault is
  ``num_attention_heads``. Llama, Mistral, Qwen2/3, Gemma 3, Phi-3, OLMo-2, ViT, DeiT, BEiT, DINOv2 read
  ``head_dim``; T5 reads ``d_kv``: their uniform head counts are expressible. Falcon's query heads
  (multi-query and grouped fused QKV, :mod:`secateur.llm.gqa`) fall under the first case: fewer query heads
  with the hidden size whole are named at ``num_attention_heads``.
- **MLP width hard-coded**: Bloom and MPT build their MLP as ``4 * hidden_size`` (MPT's ``expansion_ratio``
  is not read): a pruned MLP is never expressible; the field at fault is ``hidden_size`` (the MLP width is
  derived from it).

:func:`family_config_changes` is the writer hook ``make_plan`` calls on its proposals (it adds the
``head_dim`` a family reads where it is derived, and leaves the rest); :func:`unexpressible_fields` names,
for a plan, the config fields a family cannot write, with how to reach a loadable shape. The check that
decides loadability stays the meta-device build (:func:`secateur.io.transformers_loadable`); this module
only explains it by field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "HEAD_SIZE_FROM_HIDDEN",
    "MLP_FROM_HIDDEN",
    "family_config_changes",
    "unexpressible_fields",
]

#: ``config.model_type`` values whose attention head size is ``hidden / heads`` (no ``head_dim`` read):
#: ``{model_type: (hidden key, heads key)}``.
HEAD_SIZE_FROM_HIDDEN: dict[str, tuple[str, str]] = {
    **dict.fromkeys(
        (
            "bert",
            "roberta",
            "xlm-roberta",
            "electra",
            "albert",
            "deberta-v2",
            "opt",
            "gpt_neox",
            "stablelm",
            "bloom",
            "falcon",
        ),
        ("hidden_size", "num_attention_heads"),
    ),
    "distilbert": ("dim", "n_heads"),
    "gpt2": ("n_embd", "n_head"),
    "gptj": ("n_embd", "n_head"),
    "mpt": ("d_model", "n_heads"),
    **dict.fromkeys(
        ("bart", "mbart", "marian", "pegasus", "whisper"), ("d_model", "encoder_attention_heads")
    ),
}
#: ``config.model_type`` values whose MLP width is a fixed multiple of the hidden size, not a config field:
#: ``{model_type: (hidden key, factor)}``.
MLP_FROM_HIDDEN: dict[str, tuple[str, int]] = {"bloom": ("hidden_size", 4), "mpt": ("d_model", 4)}

_HEADS_FIX = (
    "leave the attention heads whole (prune the MLP only: protect the attention modules, or "
    "prune_channels(..., loadable=True), whose default round_to=8 leaves head groups of fewer than 8 heads "
    "whole), or prune the hidden size to exactly heads x head size (prune_normalized=True, e.g. 4 -> 3 heads "
    "of size 8 with hidden 32 -> 24), or save with secateur.save_pretrained (secateur.from_pretrained "
    "rebuilds any pruned shape)"
)
_MLP_FIX = (
    "leave the MLP whole (protect=[...mlp modules]) and prune heads and hidden size only, or save with "
    "secateur.save_pretrained (secateur.from_pretrained rebuilds any pruned shape)"
)


def family_config_changes(cfgs: Mapping[str, Any], changes: dict[str, dict[str, list]]) -> dict[str, dict]:
    """The writer hook of :func:`secateur.compact.plan.make_plan`: ``changes`` (``{config key: {field: [old,
    new]}}``, as proposed from the traced widths) adjusted per family, in place, and returned.

    Today it removes the generic ``head_dim`` entry from configs of families that do not read ``head_dim``
    when the new hidden size and head count already determine the kept head size (``hidden / heads`` equal
    to the recorded ``head_dim``): the written config is then the family's own, consistent form. Other
    entries are left as proposed; fields a family cannot express are explained by
    :func:`unexpressible_fields`, never silently dropped.

    Args:
        cfgs: ``{config key: config object}`` (:func:`secateur.compact.plan.hf_configs`).
        changes: the proposals; not copied.
    """
    for ck, d in changes.items():
        cfg = cfgs.get(ck)
        keys = HEAD_SIZE_FROM_HIDDEN.get(getattr(cfg, "model_type", None) or "")
        if keys is None or "head_dim" not in d or d["head_dim"][0] is not None:
            continue
        hidden = _new(cfg, d, keys[0])
        heads = _new(cfg, d, keys[1])
        if (
            isinstance(hidden, int)
            and isinstance(heads, int)
            and heads
            and hidden == heads * d["head_dim"][1]
        ):
            del d["head_dim"]
    return changes


def _new(cfg: Any, d: Mapping[str, list], key: str) -> Any:
    """The value ``key`` has once ``d`` is written (its proposal, else the config's current value)."""
    return d[key][1] if key in d else getattr(cfg, key, None)


def unexpressible_fields(
    model_type: str | None,
    config: Any,
    planned: Mapping[str, list],
    shape_of: Mapping[str, tuple[int, ...]],
) -> list[str]:
    """Sentences naming each config field a family's ``config.json`` cannot write for a pruned model, with
    how to reach a loadable shape; ``[]`` when this module knows of none (the meta-device build remains the
    judge: :func:`secateur.io.transformers_loadable`).

    Args:
        model_type: ``config.model_type`` (``"bert"``, ``"bloom"``, ...).
        config: the config *before* the plan's changes (its values are the dense ones).
        planned: the plan's changes of this config, ``{field: [old, new]}`` (``_inconsistent_`` keys skipped).
        shape_of: ``{state-dict key: shape}`` of the pruned model (the MLP projections are found here).
    """
    out = []
    mt = model_type or ""
    keys = HEAD_SIZE_FROM_HIDDEN.get(mt)
    heads_changed = [k for k, (old, new) in planned.items() if k in _HEAD_KEYS and old != new]
    if keys is not None and heads_changed:
        hidden_key = keys[0]
        hidden = planned[hidden_key][1] if hidden_key in planned else getattr(config, hidden_key, None)
        k = heads_changed[0]
        heads, old_heads = planned[k][1], planned[k][0]
        size = (getattr(config, hidden_key, 0) or 0) // max(1, old_heads)
        if not (isinstance(hidden, int) and hidden == heads * size):
            out.append(
                f"{k} ({old_heads} -> {heads}): {mt} derives the head size as {hidden_key} / {k} "
                f"({hidden} / {heads}), but the pruned heads keep size {size}; {_HEADS_FIX}"
            )
    kv_changed = [k for k, (old, new) in planned.items() if k in _KV_KEYS and old != new]
    if keys is not None and kv_changed and not heads_changed:
        k = kv_changed[0]
        out.append(
            f"{keys[1]}: {k} went {planned[k][0]} -> {planned[k][1]} with the query heads reading the "
            f"removed key/value heads, but {mt} derives the head size as {keys[0]} / {keys[1]}, so no "
            f"head count describes the pruned attention; {_HEADS_FIX}"
        )
    mlp = MLP_FROM_HIDDEN.get(mt)
    if mlp is not None:
        hidden_key, factor = mlp
        hidden = planned[hidden_key][1] if hidden_key in planned else getattr(config, hidden_key, None)
        widths = sorted({s[0] for key, s in shape_of.items() if _is_mlp_in(mt, key) and len(s) == 2})
        if isinstance(hidden, int) and widths and widths != [factor * hidden]:
            out.append(
                f"{hidden_key} ({hidden}): {mt} builds its MLP as {factor} x {hidden_key} = "
                f"{factor * hidden} (no config field holds the MLP width), but the pruned MLP has {widths}; "
                f"{_MLP_FIX}"
            )
    return out


_HEAD_KEYS = ("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads")
_KV_KEYS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
_MLP_IN = {"bloom": "mlp.dense_h_to_4h.weight", "mpt": "ffn.up_proj.weight"}


def _is_mlp_in(model_type: str, key: str) -> bool:
    """Whether state-dict ``key`` is the weight of a family's MLP input projection (rows = MLP width)."""
    suffix = _MLP_IN.get(model_type)
    return suffix is not None and key.endswith(suffix)
