"""FPQ as the reference code runs it: per-channel activation biases simulated, weights not shifted."""
from configs import QuantConfig
from quant_layers import E2M1, Scheme

CONFIG = QuantConfig.from_schemes("FPQ_simulated_config_llama", "fpq", weight=Scheme(E2M1, "row"),
                                  inputs=Scheme(E2M1, "tensor"), embedding=Scheme(E2M1, "tensor"), preshift="simulated")
