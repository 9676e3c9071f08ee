"""MXFP4 W4A4: clip search, then GPTQ with those scales (act-order, fed the quantized blocks' outputs, as
MXFP4_GPTQ_config). Any other named format: --format. lm_head and the embedding stay in full precision, as
llm-compressor leaves them (--ignore none quantizes them too)."""
from configs import LLM_COMPRESSOR_SETTINGS, FORMAT_SEARCH, BlockSettings, QuantConfig

CONFIG = QuantConfig(name="MXFP4_best_config", method="gptq", block=BlockSettings("MXFP4", search=True, act_order=True),
                     feed_quantized=True, **LLM_COMPRESSOR_SETTINGS, search=FORMAT_SEARCH)
