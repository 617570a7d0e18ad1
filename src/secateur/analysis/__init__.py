"""Measurement: counting parameters and MACs, per-layer tables, latency, similarity, reports."""

from secateur.analysis.counting import LayerStats, count_macs, count_params, layer_table
from secateur.analysis.latency import compare_latency, measure, measure_latency, peak_memory
from secateur.analysis.similarity import linear_cka, network_similarity, similarity_report

__all__ = [
    "LayerStats",
    "compare_latency",
    "count_macs",
    "count_params",
    "layer_table",
    "linear_cka",
    "measure",
    "measure_latency",
    "network_similarity",
    "peak_memory",
    "similarity_report",
]
