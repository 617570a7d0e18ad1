"""Callbacks that let an existing training loop drive a secateur pruner.

- :mod:`secateur.integrations.hf_trainer`: ``PruningCallback`` for the Hugging Face ``Trainer``.
- :mod:`secateur.integrations.lightning`: ``PruningCallback`` for PyTorch Lightning (imported lazily:
  Lightning is optional).

Nothing is imported here, so importing this package never pulls in either framework.
"""
