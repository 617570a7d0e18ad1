"""Allocation: how much to remove where (element masks, structured units, resource targets)."""
