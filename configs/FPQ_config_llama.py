"""LLM-FP4 "FPQ": joint format/bias search with the pre-shifted exponent bias (per-channel offsets)."""
from configs import QuantConfig
from quant_layers import E2M1, Scheme

CONFIG = QuantConfig.from_schemes("FPQ_config_llama", "fpq", weight=Scheme(E2M1, "row"), inputs=Scheme(E2M1, "tensor"),
                                  embedding=Scheme(E2M1, "tensor"), preshift="folded")
