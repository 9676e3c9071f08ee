"""MinMax INT (paper Eq. 2): symmetric absmax INT, per-row weights, per-tensor activations and table."""
from configs import QuantConfig
from quant_layers import IntElement, Scheme

INT4 = IntElement(4)  # symmetric, levels -7..7
CONFIG = QuantConfig.from_schemes("MinMax_INT_config_llama", "minmax", weight=Scheme(INT4, "row"),
                                  inputs=Scheme(INT4, "tensor"), embedding=Scheme(INT4, "tensor"), embedding_search=False)
