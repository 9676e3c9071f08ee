"""Named quantization configs. Each module here defines CONFIG, a QuantConfig; `load_config` finds it."""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import asdict, dataclass, field, fields, replace

from quant_layers.formats import NUMERICS, FPFormat
from quant_layers.schemes import PRESETS, IntElement, Scheme, preset
from quant_layers.blocks import MX_RULES
from quant_layers.search import SearchSettings
from utils.errors import UsageError

WEIGHT_QUANTIZERS = ("rtn", "gptq", "fpq_search")
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")  # transformers' names, for the calibration forwards


@dataclass(frozen=True)
class FlatSettings:
    """FlatQuant (spec part A). Defaults are the published W4A4KV4 scripts', not the reference's argparse
    (whose --flat_lr 1e-5 no script uses)."""
    w_asym: bool = False
    a_asym: bool = False
    w_groupsize: int = -1  # GPTQ and RTN weight groups (-1: one range per output row)
    q_bits: int = 16
    k_bits: int = 4
    v_bits: int = 4
    q_asym: bool = False
    k_asym: bool = True
    v_asym: bool = True
    q_groupsize: int = -1  # KV-cache groups along head_dim; -1 = one group per head (= head_dim)
    k_groupsize: int = -1
    v_groupsize: int = -1
    transform: bool = True  # False: no transforms at all (the plain RTN / GPTQ baselines)
    epochs: int = 15
    nsamples: int = 128
    cali_bsz: int = 4
    flat_lr: float = 5e-3
    cali_trans: bool = True
    add_diag: bool = True
    diag_alpha: float = 0.3
    lwc: bool = True
    lac: bool = True
    direct_inv: bool = False  # "direct" factors inverted in float64 instead of orthogonal x diagonal
    warmup: bool = False
    weight_quantizer: str = "rtn"  # rtn | gptq | fpq_search (LLM-FP4's per-row format and bias search)
    percdamp: float = 0.01
    act_order: bool = False

    def __post_init__(self):
        if self.weight_quantizer not in WEIGHT_QUANTIZERS:
            raise UsageError(f"weight quantizer must be one of {WEIGHT_QUANTIZERS}, got {self.weight_quantizer!r}")
        for name in ("q_bits", "k_bits", "v_bits"):
            if not 2 <= getattr(self, name) <= 16:
                raise UsageError(f"--{name} must be in 2..16 (16 = not quantized), got {getattr(self, name)}")
        if self.epochs < 0 or self.nsamples < 1 or self.cali_bsz < 1 or self.flat_lr <= 0:
            raise UsageError("--epochs >= 0, --nsamples >= 1, --cali_bsz >= 1 and --flat_lr > 0 are needed")
        if not 0 <= self.diag_alpha <= 1:
            raise UsageError(f"--diag_alpha must be in [0, 1], got {self.diag_alpha}")
        if not 0 <= self.percdamp:
            raise UsageError(f"--percdamp must be >= 0, got {self.percdamp}")


REPORT_SETTINGS = ("layer_errors",)  # BlockSettings fields that change what is reported, not what is calibrated


def block_parameter_settings(block: dict) -> dict:
    """Of BlockSettings as a dict (asdict, or a parameter file's record, where a field added since takes its
    default), the fields that decide the parameters."""
    defaults = {field.name: field.default for field in fields(BlockSettings)}
    return {name: value for name, value in {**defaults, **block}.items() if name not in REPORT_SETTINGS}


@dataclass(frozen=True)
class BlockSettings:
    """A named format (quant_layers.schemes.PRESETS: NVFP4, MXFP4, ..., INT4 in groups of 128) calibrated by the
    "rtn" or "gptq" method, with LLM-FP4's output-error clip search before rounding (`search`) and NVFP4's four
    over six as options."""
    format: str = "NVFP4"
    search: bool = False  # per-row clip factor of the block scales on the --search_intervals grid
    four_over_six: bool = False  # NVFP4: each weight block maps its maximum to 6 or 4, whichever errs less
    four_over_six_inputs: bool = False  # NVFP4: each input block too, at run time (a kernel the engines lack)
    hadamard: bool = False  # rotate every quantized linear's inputs (and its weight) by a block-size Hadamard
    mx_rule: str = "even"  # E8M0 scales: compressed-tensors' rounding ("even"), OCP's "floor", or "ceil"
    input_tensor_scale: str = "static"  # NVFP4 inputs: FP32 tensor scale calibrated ("static") or per input
    act_order: bool = False  # GPTQ: columns by decreasing Hessian diagonal (block scales from the original weight)
    percdamp: float = 0.01
    # report each linear's output error with quantized inputs, RTN's and the method's, where the method does not
    # compute it anyway (the search does): two more Gram matrices per linear group; the parameters do not change
    layer_errors: bool = False

    def __post_init__(self):
        if self.format not in PRESETS:
            raise UsageError(f"unknown format {self.format!r}; choose from {', '.join(PRESETS)}")
        weight, inputs = preset(self.format)
        if self.four_over_six and weight.scale != "e4m3":
            raise UsageError(f"four over six chooses between NVFP4 block scales; {self.format} has none")
        if self.four_over_six_inputs and (weight.scale != "e4m3" or inputs is None):
            raise UsageError(f"--four_over_six_inputs chooses between NVFP4 input block scales; {self.format} "
                             "quantizes no inputs to NVFP4 (use NVFP4)")
        if self.mx_rule not in MX_RULES:
            raise UsageError(f"--mx_rule must be one of {MX_RULES}, got {self.mx_rule!r}")
        if self.input_tensor_scale not in ("static", "dynamic"):
            raise UsageError(f"--input_tensor_scale must be static or dynamic, got {self.input_tensor_scale!r}")
        if not 0 <= self.percdamp:
            raise UsageError(f"--percdamp must be >= 0, got {self.percdamp}")

    def parameter_settings(self) -> dict:
        """The settings that decide the parameters: what a parameter file is checked against on reload."""
        return block_parameter_settings(asdict(self))

    def searches_inputs(self) -> bool:
        """The search includes the activation side: NVFP4's static input tensor scale (the only static parameter
        of block-scaled inputs; the MX formats' and dynamic tensor scales have none)."""
        inputs = self.schemes()[1]
        return self.search and inputs is not None and inputs.tensor_scale == "static"

    def schemes(self) -> tuple[Scheme, Scheme | None]:
        """(weight scheme, input scheme or None) of the format with these settings' scale rules."""
        weight, inputs = preset(self.format)
        if weight.scale == "e8m0":
            weight = replace(weight, rule=self.mx_rule)
            inputs = inputs and replace(inputs, rule=self.mx_rule)
        elif weight.scale == "e4m3" and inputs is not None:
            inputs = replace(inputs, tensor_scale=self.input_tensor_scale, four_over_six=self.four_over_six_inputs)
        return weight, inputs


# What the named formats (methods "rtn", "gptq") share with llm-compressor's defaults, so that their rows compare
# with its own: lm_head and the embedding stay in full precision, and calibration runs eager attention.
LLM_COMPRESSOR_SETTINGS = {"quantize_lm_head": False, "quantize_embedding": False, "calib_attention": "eager"}

# The named formats' search: one round (NVFP4's input tensor scale searched on 512 tokens for the RTN weights, then
# the weights' clip factors for those inputs); --search_round alternates more. MX inputs have no static scale.
FORMAT_SEARCH = SearchSettings(rounds=1, act_search_tokens=512)


@dataclass(frozen=True)
class QuantConfig:
    name: str
    method: str  # a registered method (utils/methods/): "minmax", "fpq_baseline", "fpq", "flatquant", ...
    element: str = "fp"  # "fp" or "int" (INT only with "minmax")
    w_bits: int = 4
    a_bits: int = 4
    e_bits: int = 4
    w_exp: int = 2
    a_exp: int = 2
    e_exp: int = 2
    # FPQ only: "simulated" keeps W and gives activations per-channel biases (the reference code);
    # "folded" moves the integer offsets 2^-k into W before quantizing it (the paper).
    preshift: str = "folded"
    # "reference": FP formats compute as the released code does (quant_layers.formats: its clip value
    # 2 * 2^(2^E - 1 - b) and step rounding); what its own parameter files need to reproduce.
    fp_numerics: str = "paper"
    embedding_search: bool = True  # FPQ configs search the table's per-row bias and format
    quantize_lm_head: bool = True
    quantize_embedding: bool = True
    feed_quantized: bool = False  # calibrate block i+1 on block i's quantized output instead of FP
    # the attention implementation of the calibration forwards (None: the model's own); the named formats use
    # llm-compressor's "eager", so that static input scales equal its own bit for bit
    calib_attention: str | None = None
    search: SearchSettings = field(default_factory=SearchSettings)
    flat: FlatSettings | None = None  # the "flatquant" method's settings
    block: BlockSettings | None = None  # the named formats' settings (methods "rtn" and "gptq")

    def __post_init__(self):
        # the method's own requirements are checked by its handler (utils/methods/)
        if self.element not in ("fp", "int"):
            raise UsageError(f"element must be 'fp' or 'int', got {self.element!r}")
        if self.fp_numerics not in NUMERICS or (self.fp_numerics == "reference" and
                                                 (self.element != "fp" or self.flat is not None)):
            raise UsageError(f"fp_numerics must be one of {NUMERICS}; 'reference' applies to the FP configs of "
                             f"LLM-FP4 (MinMax, FPQ, FPQ baseline), got {self.fp_numerics!r} with {self.name}")
        if self.calib_attention not in (None, *ATTENTION_IMPLEMENTATIONS):
            raise UsageError(f"calib_attention must be one of {ATTENTION_IMPLEMENTATIONS} or None (the model's own), "
                             f"got {self.calib_attention!r}")
        if self.preshift not in ("simulated", "folded"):
            raise UsageError(f"preshift must be 'simulated' or 'folded', got {self.preshift!r}")
        for kind in ("w", "a", "e"):
            bits, exp = getattr(self, f"{kind}_bits"), getattr(self, f"{kind}_exp")
            if not 2 <= bits <= 16:
                raise UsageError(f"--qbits: {kind.upper()} bits must be in 2..16 (16 = not quantized), got {bits}")
            if self.element == "fp" and bits < 16 and not 1 <= exp <= bits - 1:
                raise UsageError(f"--qbits: {kind.upper()} exponent bits must be in 1..{bits - 1} for "
                                 f"{bits}-bit FP, got {exp}")

    @classmethod
    def from_schemes(cls, name: str, method: str, weight: Scheme, inputs: Scheme | None,
                     embedding: Scheme | None, **settings) -> "QuantConfig":
        """A config written as its operands' schemes (None: left at 16 bits). The bit widths that --qbits replaces
        are read off the elements, and each scheme must be the one the method starts from (`scheme`), so that a
        config cannot state a granularity its method would not calibrate."""
        schemes = {"weight": weight, "input": inputs, "embedding": embedding}
        elements = [s.element for s in schemes.values() if s is not None]
        widths = {}
        for operand, kind in (("weight", "w"), ("input", "a"), ("embedding", "e")):
            element = None if schemes[operand] is None else schemes[operand].element
            widths[f"{kind}_bits"] = 16 if element is None else element.bits
            if isinstance(element, FPFormat):
                widths[f"{kind}_exp"] = element.exponent_bits
        element_kind = "fp" if all(isinstance(e, FPFormat) for e in elements) else "int"
        config = cls(name=name, method=method, element=element_kind, **widths, **settings)
        for operand, stated in schemes.items():
            if config.scheme(operand) != stated:
                raise UsageError(f"{name}: the {operand} scheme {stated} is not what the {method} method calibrates "
                                 f"({config.scheme(operand)})")
        return config

    def with_qbits(self, qbits) -> "QuantConfig":
        if len(qbits) != 6:
            raise UsageError("--qbits takes six integers: W A E bits, then W A E exponent bits (e.g. 4 4 4 2 2 2)")
        w, a, e, we, ae, ee = (int(v) for v in qbits)
        return replace(self, w_bits=w, a_bits=a, e_bits=e, w_exp=we, a_exp=ae, e_exp=ee)

    @property
    def qbits(self) -> list[int]:
        return [self.w_bits, self.a_bits, self.e_bits, self.w_exp, self.a_exp, self.e_exp]

    def scheme(self, operand: str) -> Scheme | None:
        """The scheme of "weight", "input" or "embedding" that --qbits and the element give, with the granularity
        this config's method starts from (its MinMax point; searches and GPTQ refine the ranges); None for an
        operand left at 16 bits. The one place where bit widths become formats."""
        if self.block is not None:  # a named format: the embedding table takes the weights' scheme
            weight, inputs = self.block.schemes()
            return inputs if operand == "input" else weight
        kind = {"weight": "w", "input": "a", "embedding": "e"}[operand]
        bits = getattr(self, f"{kind}_bits")
        if bits >= 16:
            return None
        if self.element == "int":
            asymmetric = self.flat is not None and operand != "embedding" and getattr(self.flat, f"{kind}_asym")
            element = IntElement(bits, symmetric=not asymmetric, full_range=self.flat is not None)
        else:
            element = FPFormat.from_bits(bits, getattr(self, f"{kind}_exp"), self.fp_numerics)
        dynamic_inputs = self.flat is not None  # FlatQuant quantizes activations per token at run time
        granularity = {"weight": "row", "input": "token" if dynamic_inputs else "tensor", "embedding": "tensor"}
        return Scheme(element, granularity[operand])

    def to_dict(self) -> dict:
        return asdict(self)


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load_config(name: str) -> QuantConfig:
    if name not in available():
        raise UsageError(f"unknown --quant_config {name!r}; choose one of: {', '.join(available())}")
    return importlib.import_module(f"{__name__}.{name}").CONFIG
