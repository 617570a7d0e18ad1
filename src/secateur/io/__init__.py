"""Pickle-free save and load of pruned models: the plan as JSON, the weights as safetensors.

- :func:`save` / :func:`load`: ``plan.json`` + ``model.safetensors`` (any model: zoo, Hugging Face, factory;
  element masks kept).
- :func:`save_pretrained` / :func:`from_pretrained`: the Hugging Face layout (``config.json`` + safetensors
  from ``model.save_pretrained``) plus ``plan.json``, for pruned Hugging Face models (see
  :mod:`secateur.io.pretrained`); :func:`load` reads these folders too.

A saved folder is data: loading runs no code it names (a user factory only when the caller passes it or
lists it in ``trust_factory``), and :mod:`secateur.io.validate` checks the folder before anything is built.
"""

from secateur.io.loading import from_pretrained, load
from secateur.io.pretrained import save_pretrained, transformers_loadable
from secateur.io.serialization import save

__all__ = ["from_pretrained", "load", "save", "save_pretrained", "transformers_loadable"]
