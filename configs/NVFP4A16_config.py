"""NVFP4 weights only (NVFP4A16), round-to-nearest. Any other named format: --format. lm_head and the embedding stay in full
precision, as llm-compressor leaves them (--ignore none quantizes them too)."""
from configs import LLM_COMPRESSOR_SETTINGS, BlockSettings, QuantConfig

CONFIG = QuantConfig(name="NVFP4A16_config", method="rtn", block=BlockSettings("NVFP4A16"), **LLM_COMPRESSOR_SETTINGS)
