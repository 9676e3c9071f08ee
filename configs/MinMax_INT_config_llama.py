"""MinMax INT (paper Eq. 2): symmetric absmax INT, per-row weights, per-tensor activations and table."""
from configs import QuantConfig

CONFIG = QuantConfig(name="MinMax_INT_config_llama", method="minmax", element="int", embedding_search=False)
