"""FlatQuant transforms with FP4 (E2M1) elements, then LLM-FP4's per-row format and exponent-bias search for
the weights; activations and the KV cache are dynamic per-token/per-head E2M1 with learned clipping."""
from configs import FlatSettings, QuantConfig

CONFIG = QuantConfig(name="FlatQuant_FP_config_llama", method="flatquant", element="fp", w_bits=4, a_bits=4,
                     e_bits=16, quantize_lm_head=False, quantize_embedding=False,
                     flat=FlatSettings(weight_quantizer="fpq_search"))
