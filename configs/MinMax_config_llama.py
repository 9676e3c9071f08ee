"""MinMax FP: the --qbits format, per-row weight and per-tensor activation absmax, no search."""
from configs import QuantConfig
from quant_layers import E2M1, Scheme

CONFIG = QuantConfig.from_schemes("MinMax_config_llama", "minmax", weight=Scheme(E2M1, "row"),
                                  inputs=Scheme(E2M1, "tensor"), embedding=Scheme(E2M1, "tensor"), embedding_search=False)
