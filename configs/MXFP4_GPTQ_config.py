"""MXFP4 W4A4 by GPTQ. Any other named format: --format. lm_head and the embedding stay in full
precision, as llm-compressor leaves them (--ignore none quantizes them too)."""
from configs import BlockSettings, QuantConfig

CONFIG = QuantConfig(name="MXFP4_GPTQ_config", method="gptq", block=BlockSettings("MXFP4"), quantize_lm_head=False,
                     quantize_embedding=False)
