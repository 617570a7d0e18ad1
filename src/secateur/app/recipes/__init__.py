"""Recipes shipped with secateur (YAML files beside this module)."""
