"""NVFP4 W4A4: clip search and four over six, then GPTQ with those scales (act-order, fed the quantized blocks'
outputs, as NVFP4_GPTQ_config). Any other named format: --format. lm_head and the embedding stay in full precision,
as llm-compressor leaves them (--ignore none quantizes them too)."""
from configs import LLM_COMPRESSOR_SETTINGS, FORMAT_SEARCH, BlockSettings, QuantConfig

CONFIG = QuantConfig(name="NVFP4_best_config", method="gptq",
                     block=BlockSettings("NVFP4", search=True, four_over_six=True, act_order=True), feed_quantized=True,
                     **LLM_COMPRESSOR_SETTINGS, search=FORMAT_SEARCH)
