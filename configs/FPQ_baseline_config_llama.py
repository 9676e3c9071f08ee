"""LLM-FP4 "FPQ baseline": joint format/bias search, one activation bias per tensor."""
from configs import QuantConfig

CONFIG = QuantConfig(name="FPQ_baseline_config_llama", method="fpq_baseline")
