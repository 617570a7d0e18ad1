"""Pruners: the element driver (Pruner), the structured driver (ChannelPruner) and thin one-shot calls."""
