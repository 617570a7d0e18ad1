"""Pickle-free save and load of pruned models: the plan as JSON, the weights as safetensors."""

from secateur.io.serialization import load, save

__all__ = ["load", "save"]
