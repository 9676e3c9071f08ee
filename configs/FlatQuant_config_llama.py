"""FlatQuant W4A4KV4 (INT, the published LLaMA scripts): trained Kronecker transforms, per-channel scaling,
learnable weight and activation clipping, asymmetric INT4 KV cache, RTN weights (--gptq for GPTQ)."""
from configs import FlatSettings, QuantConfig
from quant_layers import IntElement, Scheme

INT4 = IntElement(4, symmetric=True, full_range=True)  # levels -8..7, as FlatQuant / QuaRot
CONFIG = QuantConfig.from_schemes("FlatQuant_config_llama", "flatquant", weight=Scheme(INT4, "row"),
                                  inputs=Scheme(INT4, "token"), embedding=None, quantize_lm_head=False,
                                  quantize_embedding=False, flat=FlatSettings())
