"""NVFP4 W4A4 (E2M1, E4M3 scale per 16, FP32 tensor scale), round-to-nearest: llm-compressor's NVFP4 scheme. Any other named format: --format. lm_head and the embedding stay in full
precision, as llm-compressor leaves them (--ignore none quantizes them too)."""
from configs import LLM_COMPRESSOR_SETTINGS, BlockSettings, QuantConfig

CONFIG = QuantConfig(name="NVFP4_config", method="rtn", block=BlockSettings("NVFP4"), **LLM_COMPRESSOR_SETTINGS)
