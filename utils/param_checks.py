"""Checks of a parameter file's quantizers against the model and the requested config, before any is installed.

A file is trusted for nothing but its bytes: every quantizer must hold the format the config asks for (its
bit width, its exponent bits where the config fixes them, its numerics) whatever the metadata's `qbits`
claims, and every tensor must be present, floating point, finite and of a shape that fits its module.
Each refusal is one line naming the tensor or quantizer.
"""
from __future__ import annotations

import torch

from configs import QuantConfig
from quant_layers import QuantEmbedding
from quant_layers.quantizers import quantizer_from_state

from .errors import ParamFileError

OPERANDS = {"weight_quantizer": "weight", "act_quantizer": "input"}


def wanted_format(module, slot: str, config: QuantConfig) -> tuple[int, int | None]:
    """(bits, exponent bits or None where the search chooses them) of the quantizer `config` puts in `slot`;
    16 bits: no quantizer."""
    if isinstance(module, QuantEmbedding):
        if slot != "weight_quantizer":
            return 16, None
        fixed = config.method == "minmax" or not config.embedding_search
        return config.e_bits, config.e_exp if fixed else None
    if slot == "weight_quantizer":
        return config.w_bits, config.w_exp if config.method == "minmax" else None
    return config.a_bits, config.a_exp if config.method == "minmax" else None


def check_spec(path, name: str, slot: str, spec, module, config: QuantConfig):
    """The stored description of one quantizer against the config: kind, bits, exponent bits, numerics."""
    where = f"{path}: {name}.{slot}"
    bits, exponent = wanted_format(module, slot, config)
    if spec is None:
        if bits < 16:
            raise ParamFileError(f"{where} is missing, but --qbits asks for {bits}-bit {OPERANDS[slot]}s; "
                                 "pass the file calibrated with these --qbits")
        return
    if bits >= 16:
        raise ParamFileError(f"{where} quantizes what --qbits leaves at 16 bits; pass the --qbits the file was "
                             "calibrated with")
    if not isinstance(spec, dict) or spec.get("kind") != config.element:
        kind = spec.get("kind") if isinstance(spec, dict) else spec
        raise ParamFileError(f"{where} is of kind {kind!r}, not {config.element!r} as {config.name} asks; "
                             "pass a file of this config")
    try:
        held_bits = spec["bits"] if spec["kind"] == "int" else 1 + spec["exponent_bits"] + spec["mantissa_bits"]
        held_exponent = None if spec["kind"] == "int" else spec["exponent_bits"]
    except (KeyError, TypeError):
        raise ParamFileError(f"{where} has an incomplete description {spec}; re-run the calibration") from None
    if held_bits != bits:
        raise ParamFileError(f"{where} holds {held_bits}-bit values where --qbits asks for {bits}; the file was "
                             "calibrated with other --qbits, whatever its metadata says")
    if exponent is not None and held_exponent is not None and held_exponent != exponent:
        raise ParamFileError(f"{where} holds exponent bits {held_exponent} where --qbits asks for {exponent}; "
                             "pass the --qbits the file was calibrated with")
    if spec["kind"] == "fp" and spec.get("numerics", "paper") != config.fp_numerics:
        raise ParamFileError(f"{where} was searched with --fp_numerics {spec.get('numerics', 'paper')}, not "
                             f"{config.fp_numerics}; pass --fp_numerics {spec.get('numerics', 'paper')}")


def required_tensors(spec: dict) -> tuple[str, ...]:
    if spec.get("dynamic"):
        return ()
    if spec["kind"] == "fp":
        return ("bias",)
    return ("scale",) if spec.get("symmetric", True) else ("scale", "zero")


def operand_shape(module, slot: str) -> tuple[int, ...]:
    """The shape a quantizer of `slot` is applied to: the weight, or one row of inputs."""
    if slot == "weight_quantizer":
        return tuple(module.weight.shape)
    return (1, module.in_features)


def check_tensor(path, key: str, tensor: torch.Tensor | None, fits: tuple[int, ...] | None, positive=False):
    """Present, floating point, finite, and broadcasting to `fits` without changing it (None: any shape)."""
    if tensor is None:
        raise ParamFileError(f"{path} has no tensor {key}; the file is incomplete, re-run the calibration")
    if not tensor.is_floating_point():
        raise ParamFileError(f"{path}: {key} has dtype {tensor.dtype}, not a floating-point type; re-run the calibration")
    if fits is not None:
        try:
            fitting = torch.broadcast_shapes(tuple(tensor.shape), fits) == fits
        except RuntimeError:
            fitting = False
        if not fitting:
            raise ParamFileError(f"{path}: {key} has shape {tuple(tensor.shape)}, which does not fit this model's "
                                 f"{fits}; pass the file of this model")
    if not torch.isfinite(tensor).all():
        raise ParamFileError(f"{path}: {key} holds NaN or infinite values; re-run the calibration")
    if positive and not (tensor > 0).all():
        raise ParamFileError(f"{path}: {key} holds scales that are not positive; re-run the calibration")


def check_module(path, name: str, entry: dict, module, tensors: dict, config: QuantConfig):
    """One module's entry and tensors of a parameter file."""
    if config.block is not None:
        return check_format_module(path, name, entry, module, tensors, config)
    for slot in OPERANDS:
        spec = entry.get(slot)
        check_spec(path, name, slot, spec, module, config)
        if spec is None:
            continue
        for leaf in required_tensors(spec):
            key = f"{name}.{slot}.{leaf}"
            check_tensor(path, key, tensors.get(key), operand_shape(module, slot), positive=leaf == "scale")
    shift = f"{name}.input_shift"
    if shift in tensors:
        check_tensor(path, shift, tensors[shift], (module.in_features,))


def check_format_module(path, name: str, entry: dict, module, tensors: dict, config: QuantConfig):
    """A named format's module: each quantizer's scheme is the config's, its ranges fit the weight's blocks, and
    GPTQ's weight codes (when stored) have the weight's shape."""
    table = isinstance(module, QuantEmbedding)
    for slot, operand in OPERANDS.items():
        wanted = None if table and slot == "act_quantizer" else config.scheme("embedding" if table else operand)
        spec, where = entry.get(slot), f"{path}: {name}.{slot}"
        if (spec is None) != (wanted is None):
            state = "missing" if spec is None else "present"
            raise ParamFileError(f"{where} is {state}, unlike in {config.name} ({config.block.format}); pass a file of "
                                 "this format")
        if spec is None:
            continue
        prefix = f"{name}.{slot}."
        values = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        for key, tensor in values.items():
            check_tensor(path, prefix + key, tensor, None, positive=key != "zero")
        try:
            quantizer = quantizer_from_state(spec, values)
            held = quantizer.spec()
        except (KeyError, TypeError, ValueError) as error:
            raise ParamFileError(f"{where} has an unreadable description ({error}); re-run the calibration") from None
        if held != wanted:
            raise ParamFileError(f"{where} holds {held.name}, not {wanted.name} as {config.name} asks; pass a file of "
                                 "this format")
        if not held.dynamic and tuple(quantizer.scale.shape[:2]) != range_shape(module.weight.shape, held.group_size):
            raise ParamFileError(f"{path}: {prefix}scale has shape {tuple(quantizer.scale.shape)}, which does not fit "
                                 f"this model's weight {tuple(module.weight.shape)}; pass the file of this model")
    codes = tensors.get(f"{name}.weight_codes")
    if codes is not None and (codes.is_floating_point() or tuple(codes.shape) != tuple(module.weight.shape)):
        raise ParamFileError(f"{path}: {name}.weight_codes is not an integer tensor of the weight's shape "
                             f"{tuple(module.weight.shape)}; pass the file of this model")


def range_shape(weight_shape, group_size: int) -> tuple[int, int]:
    rows, columns = weight_shape
    return rows, columns // group_size
