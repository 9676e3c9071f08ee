"""FlatQuant transforms trained for MXFP4 W4A4 (E2M1, E8M0 power-of-two scale per 32), then folded: weights by
MXFP4 round-to-nearest with the learned per-row clip of their block scales, inputs by MXFP4's dynamic blocks. No
KV-cache quantization and no learned activation clipping, as in NVFP4_FlatQuant_config. --gptq for GPTQ."""
from configs import BlockSettings, FlatSettings, QuantConfig

CONFIG = QuantConfig(name="MXFP4_FlatQuant_config", method="flatquant", w_bits=4, a_bits=4, e_bits=16,
                     quantize_lm_head=False, quantize_embedding=False,
                     flat=FlatSettings(q_bits=16, k_bits=16, v_bits=16, lac=False), block=BlockSettings("MXFP4"))
