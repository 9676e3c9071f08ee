"""MXFP4 W4A4 with every quantized linear's inputs and weight rotated by a Hadamard matrix of the block size (32),
then GPTQ as MXFP4_GPTQ_config (act-order, fed the quantized blocks' outputs): MR-GPTQ's recipe. The rotation
spreads an outlier over its block, where a shared power-of-two scale loses least. It is applied online to the
inputs, so the model does not export as a compressed-tensors checkpoint. lm_head and the embedding stay in full
precision, as llm-compressor leaves them (--ignore none quantizes them too)."""
from configs import LLM_COMPRESSOR_SETTINGS, BlockSettings, QuantConfig

CONFIG = QuantConfig(name="MXFP4_Hadamard_GPTQ_config", method="gptq",
                     block=BlockSettings("MXFP4", act_order=True, hadamard=True), feed_quantized=True,
                     **LLM_COMPRESSOR_SETTINGS)
