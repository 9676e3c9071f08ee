"""MXFP4 W4A4 (E2M1, E8M0 power-of-two scale per 32), round-to-nearest. Any other named format: --format. lm_head and the embedding stay in full
precision, as llm-compressor leaves them (--ignore none quantizes them too)."""
from configs import LLM_COMPRESSOR_SETTINGS, BlockSettings, QuantConfig

CONFIG = QuantConfig(name="MXFP4_config", method="rtn", block=BlockSettings("MXFP4"), **LLM_COMPRESSOR_SETTINGS)
