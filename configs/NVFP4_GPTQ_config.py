"""NVFP4 W4A4 by GPTQ (block scales from the weights GPTQ has updated when it reaches each block). Any other named format: --format. lm_head and the embedding stay in full
precision, as llm-compressor leaves them (--ignore none quantizes them too)."""
from configs import BlockSettings, QuantConfig

CONFIG = QuantConfig(name="NVFP4_GPTQ_config", method="gptq", block=BlockSettings("NVFP4"), quantize_lm_head=False,
                     quantize_embedding=False)
