"""INT4 weights in groups of 128 (symmetric, -8..7), round-to-nearest: the common W4A16 baseline. Any other named format: --format. lm_head and the embedding stay in full
precision, as llm-compressor leaves them (--ignore none quantizes them too)."""
from configs import LLM_COMPRESSOR_SETTINGS, BlockSettings, QuantConfig

CONFIG = QuantConfig(name="W4A16_G128_config", method="rtn", block=BlockSettings("W4A16_G128"), **LLM_COMPRESSOR_SETTINGS)
