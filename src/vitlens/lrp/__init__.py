"""Layer-wise relevance propagation for transformers (AttnLRP, CP-LRP) with Gamma rules."""

from vitlens.lrp.composite import LRPConfig, LRPRecorder, input_relevance, lrp_rules

__all__ = ["LRPConfig", "LRPRecorder", "input_relevance", "lrp_rules"]
