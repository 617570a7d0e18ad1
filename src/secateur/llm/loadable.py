"""Whether a pruned Hugging Face model's own ``config.json`` describes it, checked before and after pruning.

A Hugging Face config holds one ``num_attention_heads``, one ``num_key_value_heads`` and one
``intermediate_size`` for every layer, and plain ``transformers`` ``from_pretrained`` builds the model from it
before loading the weights. A structurally pruned model is therefore loadable by plain ``transformers`` only
when every layer has the same counts and the class reads them from the config (Llama, Qwen2, Mistral, Gemma 3
read ``head_dim`` too; GPT-2 derives its head width from ``n_embd / n_head`` and cannot express pruned heads).

The checks live in :mod:`secateur.io.loadable` (below the pruners, which use them for ``loadable=True``) and
are re-exported here for the LLM drivers:

- :func:`planned_config_mismatch` answers, *before* anything is changed, whether the config a plan rewrites
  builds the pruned shapes (a meta-device build compared with the plan's shapes): ``prune_decoder(...,
  uniform=True)`` refuses with a named :class:`~secateur.errors.ConfigError` when it does not.
- :func:`refuse_plain_save` makes, *after* pruning, the model's own ``save_pretrained`` raise
  :class:`UnloadableConfigError` (naming the config field and how to reach a loadable shape) when the
  config cannot describe it, instead of writing a folder that ``from_pretrained`` refuses later.
  :func:`secateur.save_pretrained` (which writes the plan beside the weights) and :func:`secateur.save` keep
  working: they rebuild the model from the original config and the plan.
"""

from __future__ import annotations

from secateur.io.loadable import (
    PlainSaveRefusal,
    UnloadableShapeError,
    plain_save_problems,
    planned_config_mismatch,
    planned_load_problems,
    refuse_plain_save,
)
from secateur.io.pretrained import UnloadableConfigError

__all__ = [
    "PlainSaveRefusal",
    "UnloadableConfigError",
    "UnloadableShapeError",
    "planned_config_mismatch",
    "plain_save_problems",
    "planned_load_problems",
    "refuse_plain_save",
]
