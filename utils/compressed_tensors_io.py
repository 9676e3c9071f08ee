"""compressed-tensors checkpoints: the layout shared by the exporter (utils/export.py) and the reader.

A quantized Linear `P` of the formats written here is stored as compressed-tensors' compressors store it:
- NVFP4 (`nvfp4-pack-quantized`): `P.weight_packed` uint8 [out, in / 2] (two E2M1 codes a byte, the even column
  in the low nibble), `P.weight_scale` float8_e4m3fn [out, in / 16], `P.weight_global_scale` fp32 [1] and, with
  quantized inputs, their static `P.input_global_scale` fp32 [1]; value = code * scale / global scale.
- MXFP4 (`mxfp4-pack-quantized`): `P.weight_packed` as above, `P.weight_scale` uint8 E8M0 [out, in / 32].
- INT4 groups (`pack-quantized`): `P.weight_packed` int32 [out, in / 8] (compressed-tensors' own packing
  helpers), `P.weight_scale` [out, in / group], `P.weight_shape` int [2].
The numbers come from the quantizers' own encode/decode; this module only moves bits.

Reading builds the model in full precision with each packed weight decoded exactly, wrapped in a QuantLinear
whose frozen weight quantizer describes it and whose input quantizer is the one the config states, so the
model runs on the project's fake-quantized forward.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from quant_layers import QuantLinear
from quant_layers.blocks import BlockQuantizer, mx_scales
from quant_layers.formats import FPFormat
from quant_layers.quantizers import IntQuantizer

from .errors import UsageError

E2M1 = FPFormat(2, 1)
# our named format -> (compressed-tensors' preset scheme, its compression format)
EXPORTS = {"NVFP4": ("NVFP4", "nvfp4-pack-quantized"), "NVFP4A16": ("NVFP4A16", "nvfp4-pack-quantized"),
           "MXFP4": ("MXFP4", "mxfp4-pack-quantized"), "MXFP4A16": ("MXFP4A16", "mxfp4-pack-quantized"),
           "W4A16_G128": ("W4A16", "pack-quantized")}
E8M0_BIAS = 127


# ----- bit layout -----
def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [rows, n] -> uint8 [rows, n / 2]: the even column in the low nibble."""
    codes = codes.to(torch.uint8) & 0xF
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, n / 2] -> int32 codes [rows, n] (inverse of pack_nibbles)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2).int()


def e8m0_codes(scales: torch.Tensor) -> torch.Tensor:
    """Powers of two -> their E8M0 byte (exponent + 127), read off the float's exponent field."""
    _, exponent = torch.frexp(scales.float())  # scale = 0.5 * 2^exponent
    return (exponent - 1 + E8M0_BIAS).to(torch.uint8)


def int_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    return pack_to_int32(codes.to(torch.int8), bits)


def int_unpack(packed: torch.Tensor, bits: int, shape) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    return unpack_from_int32(packed, bits, torch.Size(shape)).int()


# ----- detection and config -----
def quantization_config_of(folder) -> dict | None:
    """The compressed-tensors `quantization_config` of an HF model folder's config.json, or None."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text(encoding="utf-8")).get("quantization_config")
    return config if config and config.get("quant_method") == "compressed-tensors" else None


def matches(name: str, module: nn.Module, patterns) -> bool:
    """compressed-tensors' target syntax: a module class name, an exact module name, or "re:<regex>"."""
    for pattern in patterns or ():
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif pattern in (name, type(module).__name__):
            return True
    return False


class CheckpointScheme:
    """One config group: how its weights are stored and how its inputs are quantized."""

    def __init__(self, group: dict, default_format: str | None, folder):
        self.targets, self.format = group.get("targets", []), group.get("format") or default_format
        weights, inputs = group.get("weights") or {}, group.get("input_activations")
        kind = (weights.get("type"), weights.get("num_bits"), weights.get("strategy"), weights.get("group_size"))
        known = {("float", 4, "tensor_group", 16): "NVFP4", ("float", 4, "group", 32): "MXFP4"}
        self.element = known.get(kind)
        if kind[:3] == ("int", 4, "group") and weights.get("symmetric", True) and kind[3]:
            self.element = "INT4"
        if self.element is None or (inputs is not None and not self.inputs_supported(inputs)) \
                or group.get("output_activations"):
            raise UsageError(f"{folder}: compressed-tensors scheme {json.dumps(group, sort_keys=True)} is not one "
                             "this toolkit reads (NVFP4, MXFP4, their A16 variants, symmetric INT4 groups)")
        self.group_size, self.quantizes_inputs = kind[3], inputs is not None

    def inputs_supported(self, inputs: dict) -> bool:
        """Inputs as NVFP4 and MXFP4 quantize them: dynamic FP4 blocks of the weights' size."""
        wanted = {"NVFP4": ("tensor_group", 16, "local"), "MXFP4": ("group", 32, True)}.get(self.element)
        given = (inputs.get("strategy"), inputs.get("group_size"), inputs.get("dynamic"))
        return (inputs.get("type"), inputs.get("num_bits")) == ("float", 4) and given == wanted

    def weight(self, tensors: dict) -> tuple[torch.Tensor, nn.Module]:
        """(the decoded weight in float32, the static quantizer that describes it) from a module's tensors."""
        packed, scale = tensors["weight_packed"], tensors["weight_scale"]
        if self.element == "INT4":
            shape = tensors["weight_shape"].tolist()
            quantizer = IntQuantizer(4, scale=scale.float().unsqueeze(-1), full_range=True, group_size=self.group_size)
            codes = int_unpack(packed, 4, shape)
            ranges = {"scale": quantizer.scale}
        elif self.element == "NVFP4":
            quantizer = BlockQuantizer(E2M1, 16, "e4m3", scale.float(), tensors["weight_global_scale"].float())
            codes = unpack_nibbles(packed)
            ranges = {"scale": quantizer.scale, "tensor_scale": quantizer.tensor_scale}
        else:
            quantizer = BlockQuantizer(E2M1, 32, "e8m0", mx_scales(scale))
            codes = unpack_nibbles(packed)
            ranges = {"scale": quantizer.scale}
        return quantizer.decode(codes, ranges), quantizer

    def input_quantizer(self, tensors: dict) -> nn.Module | None:
        if not self.quantizes_inputs:
            return None
        if self.element == "MXFP4":
            return BlockQuantizer(E2M1, 32, "e8m0", dynamic=True, rule="even")
        return BlockQuantizer(E2M1, 16, "e4m3", tensor_scale=tensors.get("input_global_scale"), dynamic=True)


def checkpoint_schemes(config: dict, folder) -> list[CheckpointScheme]:
    if config.get("quantization_status", "compressed") != "compressed":
        raise UsageError(f"{folder}: quantization_status {config['quantization_status']!r}; only compressed "
                         "checkpoints are read")
    if config.get("transform_config"):
        raise UsageError(f"{folder}: online transforms (transform_config) are not supported by this toolkit")
    return [CheckpointScheme(group, config.get("format"), folder) for group in config.get("config_groups", {}).values()]


# ----- reading -----
def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{folder}: no safetensors files next to its config.json")
    tensors = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


def module_tensors(tensors: dict, path: str) -> dict:
    prefix = path + "."
    return {key[len(prefix):]: value for key, value in tensors.items()
            if key.startswith(prefix) and "." not in key[len(prefix):]}


def check_zero_points(tensors: dict, path: str, folder):
    """Symmetric schemes carry no zero point; llm-compressor may still write all-zero ones, which change nothing."""
    for name, value in tensors.items():
        if name.endswith("zero_point") and value.float().abs().max() > 0:
            raise UsageError(f"{folder}: {path}.{name} is not zero; asymmetric checkpoints are not supported")


def load_compressed(folder, dtype: torch.dtype | str = "auto", device: str = "cpu"):
    """A compressed-tensors checkpoint as a fake-quantized model: full-precision modules as stored, each
    quantized Linear decoded exactly and wrapped in a frozen QuantLinear. `dtype` "auto": the folder's."""
    from transformers import AutoConfig, AutoModelForCausalLM
    folder = Path(folder)
    quant_config = quantization_config_of(folder)
    schemes = checkpoint_schemes(quant_config, folder)
    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=config.dtype if dtype == "auto" else dtype)
    tensors = read_tensors(folder)
    wrapped = {}
    for path, module in list(model.named_modules()):
        scheme = next((s for s in schemes if matches(path, module, s.targets)), None)
        if not isinstance(module, nn.Linear) or scheme is None or matches(path, module, quant_config.get("ignore")):
            continue
        own = module_tensors(tensors, path)
        if "weight_packed" not in own:
            raise UsageError(f"{folder}: {path} is quantized by its config but has no {path}.weight_packed")
        check_zero_points(own, path, folder)
        wrapped[path] = quantized_linear(module, scheme, own)
    plain = {key: value for key, value in tensors.items() if not packed_key(key, wrapped)}
    missing, unexpected = model.load_state_dict(plain, strict=False)
    missing = [key for key in missing if not packed_key(key, wrapped) and not tied(model, key)]
    if missing or unexpected:
        raise UsageError(f"{folder}: the checkpoint does not fit its config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    model.tie_weights()
    for path, module in wrapped.items():
        model.set_submodule(path, module)
    return model.to(device).eval().requires_grad_(False)


def packed_key(key: str, wrapped: dict) -> bool:
    """A tensor of a quantized Linear other than its bias (which loads as it is)."""
    owner, _, leaf = key.rpartition(".")
    return owner in wrapped and leaf != "bias"


def tied(model, key: str) -> bool:
    """lm_head.weight of a model with tied embeddings: not in the file, it is the embedding table."""
    return key.endswith("weight") and model.config.get_text_config().tie_word_embeddings and \
        model.get_output_embeddings() is model.get_submodule(key.rpartition(".")[0])


def quantized_linear(linear: nn.Linear, scheme: CheckpointScheme, tensors: dict) -> QuantLinear:
    weight, quantizer = scheme.weight(tensors)
    module = QuantLinear(linear)
    module.weight = nn.Parameter(weight.to(linear.weight.dtype), requires_grad=False)
    module.weight_quantizer, module.act_quantizer = quantizer, scheme.input_quantizer(tensors)
    module.freeze(on_grid=True)
    module.release_original()
    return module
