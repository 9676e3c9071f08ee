"""MXFP4 W4A4 by GPTQ, as GPTQ is run in practice (llm-compressor's defaults): columns in act-order with each block's
scales from the original weight, and each block's Hessians from the inputs the already quantized blocks give it
(--no-act_order, --no-feed_quantized undo either). Any other named format: --format. lm_head and the embedding stay
in full precision, as llm-compressor leaves them (--ignore none quantizes them too)."""
from configs import LLM_COMPRESSOR_SETTINGS, BlockSettings, QuantConfig

CONFIG = QuantConfig(name="MXFP4_GPTQ_config", method="gptq", block=BlockSettings("MXFP4", act_order=True),
                     feed_quantized=True, **LLM_COMPRESSOR_SETTINGS)
