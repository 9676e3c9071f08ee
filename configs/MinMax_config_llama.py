"""MinMax FP: the --qbits format, per-row weight and per-tensor activation absmax, no search."""
from configs import QuantConfig

CONFIG = QuantConfig(name="MinMax_config_llama", method="minmax", embedding_search=False)
