"""NVFP4 weights only (NVFP4A16), round-to-nearest. Any other named format: --format. lm_head and the embedding stay in full
precision, as llm-compressor leaves them (--ignore none quantizes them too)."""
from configs import BlockSettings, QuantConfig

CONFIG = QuantConfig(name="NVFP4A16_config", method="rtn", block=BlockSettings("NVFP4A16"), quantize_lm_head=False,
                     quantize_embedding=False)
