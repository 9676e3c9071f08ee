"""FlatQuant transforms with FP4 (E2M1) elements, then LLM-FP4's per-row format and exponent-bias search for
the weights; activations and the KV cache are dynamic per-token/per-head E2M1 with learned clipping."""
from configs import FlatSettings, QuantConfig
from quant_layers import E2M1, Scheme

CONFIG = QuantConfig.from_schemes("FlatQuant_FP_config_llama", "flatquant", weight=Scheme(E2M1, "row"),
                                  inputs=Scheme(E2M1, "token"), embedding=None, quantize_lm_head=False,
                                  quantize_embedding=False, flat=FlatSettings(weight_quantizer="fpq_search"))
