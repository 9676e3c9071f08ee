"""NVFP4_FlatQuant_config with the folded weights quantized by GPTQ (each block's scale fixed from the weights GPTQ
has updated when it reaches the block) instead of round-to-nearest."""
from configs import BlockSettings, FlatSettings, QuantConfig

CONFIG = QuantConfig(name="NVFP4_FlatQuant_GPTQ_config", method="flatquant", w_bits=4, a_bits=4, e_bits=16,
                     quantize_lm_head=False, quantize_embedding=False,
                     flat=FlatSettings(q_bits=16, k_bits=16, v_bits=16, lac=False, weight_quantizer="gptq"),
                     block=BlockSettings("NVFP4"))
