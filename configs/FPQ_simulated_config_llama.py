"""FPQ as the reference code runs it: per-channel activation biases simulated, weights not shifted."""
from configs import QuantConfig

CONFIG = QuantConfig(name="FPQ_simulated_config_llama", method="fpq", preshift="simulated")
