"""FlatQuant W4A4KV4 (INT, the published LLaMA scripts): trained Kronecker transforms, per-channel scaling,
learnable weight and activation clipping, asymmetric INT4 KV cache, RTN weights (--gptq for GPTQ)."""
from configs import FlatSettings, QuantConfig

CONFIG = QuantConfig(name="FlatQuant_config_llama", method="flatquant", element="int", w_bits=4, a_bits=4,
                     e_bits=16, quantize_lm_head=False, quantize_embedding=False, flat=FlatSettings())
