"""FlatQuant transforms trained for NVFP4 W4A4 (E2M1, E4M3 scale per 16, FP32 tensor scale), then folded: weights
by NVFP4 round-to-nearest with the learned per-row clip of their block scales, inputs by NVFP4's dynamic blocks
with a calibrated input tensor scale. No KV-cache quantization. Learned activation clipping is off: the engines
compute activation block scales at run time and cannot apply it (--lac trains with it anyway). --gptq for GPTQ,
--format for another named format; lm_head and the embedding stay in full precision."""
from configs import BlockSettings, FlatSettings, QuantConfig

CONFIG = QuantConfig(name="NVFP4_FlatQuant_config", method="flatquant", w_bits=4, a_bits=4, e_bits=16,
                     quantize_lm_head=False, quantize_embedding=False,
                     flat=FlatSettings(q_bits=16, k_bits=16, v_bits=16, lac=False), block=BlockSettings("NVFP4"))
