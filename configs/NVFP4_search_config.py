"""NVFP4 W4A4: LLM-FP4's output-error search of a per-row clip factor of the block scales, then rounding. Any other named format: --format. lm_head and the embedding stay in full
precision, as llm-compressor leaves them (--ignore none quantizes them too)."""
from configs import LLM_COMPRESSOR_SETTINGS, FORMAT_SEARCH, BlockSettings, QuantConfig

CONFIG = QuantConfig(name="NVFP4_search_config", method="rtn", block=BlockSettings("NVFP4", search=True), **LLM_COMPRESSOR_SETTINGS, search=FORMAT_SEARCH)
