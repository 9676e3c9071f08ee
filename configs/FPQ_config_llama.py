"""LLM-FP4 "FPQ": joint format/bias search with the pre-shifted exponent bias (per-channel offsets)."""
from configs import QuantConfig

CONFIG = QuantConfig(name="FPQ_config_llama", method="fpq", preshift="folded")
