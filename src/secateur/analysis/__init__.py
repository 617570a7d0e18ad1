"""Measurement: counting parameters and MACs, per-layer tables, reports."""

from secateur.analysis.counting import LayerStats, count_macs, count_params, layer_table

__all__ = ["LayerStats", "count_macs", "count_params", "layer_table"]
