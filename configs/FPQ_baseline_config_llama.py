"""LLM-FP4 "FPQ baseline": joint format/bias search, one activation bias per tensor."""
from configs import QuantConfig
from quant_layers import E2M1, Scheme

CONFIG = QuantConfig.from_schemes("FPQ_baseline_config_llama", "fpq_baseline", weight=Scheme(E2M1, "row"),
                                  inputs=Scheme(E2M1, "tensor"), embedding=Scheme(E2M1, "tensor"))
