"""Numerics: element formats, fake quantizers, wrapped modules, the LLM-FP4 search and GPTQ. No model knowledge."""
from .blocks import BlockQuantizer
from .formats import E2M1, FPFormat, fp_formats, fp_grid, fp_quantize
from .gptq import GPTQResult, HessianAccumulator, gptq_quantize, rtn_quantize
from .modules import QuantEmbedding, QuantLinear
from .quantizers import FPQuantizer, IntQuantizer
from .schemes import IntElement, Scheme, make_quantizer
from .search import LinearSearch, SearchSettings, search_embedding

__all__ = ["BlockQuantizer", "E2M1", "FPFormat", "fp_formats", "fp_grid", "fp_quantize", "GPTQResult", "HessianAccumulator", "gptq_quantize",
           "rtn_quantize", "QuantEmbedding", "QuantLinear", "FPQuantizer", "IntQuantizer", "IntElement", "Scheme", "make_quantizer", "LinearSearch",
           "SearchSettings", "search_embedding"]
