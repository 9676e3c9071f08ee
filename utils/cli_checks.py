"""Checks of the command line, done before any model is loaded (and, for what needs the model's config,
before any calibration): every numeric flag against its range, values of --device and --model_args, local
data paths, and flags that contradict each other or that the chosen method would ignore. Each failure is a
one-line UsageError naming the flag and the fix, so a bad value never becomes a default, a traceback or a
result computed with other settings than the ones asked for.
"""
from __future__ import annotations

import math
import re
from dataclasses import fields, replace
from pathlib import Path

from configs import FlatSettings, load_config

from .compressed_tensors_io import quantization_config_of
from .data import check_source
from .errors import UsageError
from .files import check_output_folder
from .models import OFFLINE_MODELS, parse_model_args

DTYPES = ("auto", "float16", "bfloat16", "float32")
DEFAULT_QUANT_CONFIG = "FPQ_config_llama"
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?|mps")


def at_least(minimum):
    return lambda v: v >= minimum, f">= {minimum}"


BITS = (lambda v: 2 <= v <= 16, "in 2..16 (16 = not quantized)")
GROUP_SIZE = (lambda v: v == -1 or v >= 1, "-1 (one group per row or head) or >= 1")
# flag -> (accepts the value, what is accepted); checked only when the flag is given (None = its default)
RANGES = {
    "calib_size": at_least(1), "calib_seqlen": at_least(2), "ppl_seqlen": at_least(2), "ppl_limit": at_least(1),
    "limit": (lambda v: 0 < v < 1 or v == int(v) >= 1, "a fraction in (0, 1) or a whole number >= 1"),
    "num_fewshot": at_least(0), "seed": (lambda v: 0 <= v < 2 ** 32, "in 0..4294967295"),
    "search_round": at_least(1), "act_search_tokens": at_least(1),
    "w_bits": BITS, "a_bits": BITS, "q_bits": BITS, "k_bits": BITS, "v_bits": BITS,
    "w_groupsize": GROUP_SIZE, "q_groupsize": GROUP_SIZE, "k_groupsize": GROUP_SIZE, "v_groupsize": GROUP_SIZE,
    "epochs": at_least(0), "nsamples": at_least(1), "cali_bsz": at_least(1), "flat_lr": (lambda v: v > 0, "> 0"),
    "diag_alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"), "percdamp": at_least(0),
}

FORMAT_FLAGS = ("format", "four_over_six", "four_over_six_inputs", "hadamard", "mx_rule", "input_tensor_scale",
                "layer_errors")
SEARCH_FLAGS = ("search_round", "search_intervals", "search_grid", "search_strategy", "format_space",
                "act_search_tokens")
# Flags of the FlatQuant method: its settings (FlatSettings' fields; `transform` is --no_transform) and files.
FLAT_FLAGS = tuple(f.name for f in fields(FlatSettings) if f.name != "transform") + (
    "w_bits", "a_bits", "gptq", "no_transform", "reload_matrix", "matrix_path")
# Flags that only change what a method calibrates or loads, by the methods that read them; any other method
# (or --fp_only, which quantizes nothing) would silently drop them.
FLAGS_OF_METHODS = {
    "preshift": ("fpq",), "shift_rounding": ("fpq",), "fp_numerics": ("minmax", "fpq_baseline", "fpq"),
    "feed_quantized": ("minmax", "fpq_baseline", "fpq", "rtn", "gptq"),
    "calib_attention": ("minmax", "fpq_baseline", "fpq", "rtn", "gptq"),
    "reuse_params": ("minmax", "fpq_baseline", "fpq", "rtn", "gptq"),
    **{name: ("fpq_baseline", "fpq", "flatquant") for name in SEARCH_FLAGS},
    **{name: ("flatquant",) for name in FLAT_FLAGS},
    "only_eval": ("minmax", "fpq_baseline", "fpq", "flatquant", "rtn", "gptq"),
    "ptq_param_path": ("minmax", "fpq_baseline", "fpq", "flatquant", "rtn", "gptq"),
    "calib_size": ("minmax", "fpq_baseline", "fpq", "flatquant", "rtn", "gptq"),
    **{name: ("rtn", "gptq") for name in FORMAT_FLAGS},
    "act_order": ("flatquant", "gptq"), "percdamp": ("flatquant", "gptq"),
    "qbits": ("minmax", "fpq_baseline", "fpq", "flatquant"),
    "ignore": ("minmax", "fpq_baseline", "fpq", "rtn", "gptq"),
}
# what the named formats' search reads: its grid and strategy; rounds and a token sample only where it searches
# the inputs' side too (NVFP4's static input tensor scale)
FORMAT_SEARCH_FLAGS = ("search_intervals", "search_grid", "search_strategy")
INPUT_SEARCH_FLAGS = ("search_round", "act_search_tokens")


def given(args, name) -> bool:
    return getattr(args, name, None) not in (None, False)


def check_arguments(args):
    """Everything that can be checked from the command line alone; run before anything is loaded."""
    check_ranges(args)
    check_search_intervals(args.search_intervals)
    check_batch_size(args.batch_size)
    device_name(args.device)
    check_model_args(args.model_args)
    for source in [args.calib_dataset, *args.eval_ppl]:
        check_source(source)
    check_quantized_checkpoint(args)
    check_method_flags(args)
    check_offload(args)


def quant_config_name(args) -> str:
    return args.quant_config or DEFAULT_QUANT_CONFIG


def quantized_checkpoint(args) -> dict | None:
    """The compressed-tensors quantization_config of --model_args pretrained=FOLDER, or None."""
    return quantization_config_of(parse_model_args(args.model_args)["pretrained"])


def check_quantized_checkpoint(args):
    """A compressed-tensors folder is already quantized: it is evaluated as it is, never quantized again."""
    if quantized_checkpoint(args) is None:
        if args.save_compressed and args.fp_only:
            raise UsageError("--save_compressed writes a quantized model; drop --fp_only")
        return
    folder = parse_model_args(args.model_args)["pretrained"]
    for flag in ("quant_config", "fp_only", "save_compressed"):
        if given(args, flag):
            raise UsageError(f"--{flag}: {folder} is already quantized (a compressed-tensors checkpoint); drop "
                             f"--{flag} to evaluate it as it is")


def check_ranges(args):
    for name, (accepts, accepted) in RANGES.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if not math.isfinite(value) or not accepts(value):
            raise UsageError(f"--{name} must be {accepted}, got {value:g}")


def check_search_intervals(intervals):
    if intervals is None:
        return
    g1, g2, n = intervals
    if not (math.isfinite(g2) and 0 < g1 < g2):
        raise UsageError(f"--search_intervals needs 0 < gamma1 < gamma2, got {g1:g} {g2:g}")
    if not (math.isfinite(n) and n == int(n) and n >= 1):
        raise UsageError(f"--search_intervals n must be a whole number >= 1, got {n:g}")


def check_batch_size(batch_size: str):
    if re.fullmatch(r"auto(:\d+)?", batch_size) or (batch_size.isdigit() and int(batch_size) >= 1):
        return
    raise UsageError(f"--batch_size must be a whole number >= 1, 'auto' or 'auto:N', got {batch_size!r}")


def device_name(requested: str | None) -> str | None:
    """--device in lower case (CPU = cpu); anything but cpu, cuda, cuda:N or mps is refused."""
    if requested is None:
        return None
    device = requested.strip().lower()
    if not DEVICE_PATTERN.fullmatch(device):
        raise UsageError(f"--device must be cpu, cuda, cuda:N or mps, got {requested!r}")
    return device


def check_model_args(model_args: str) -> dict:
    parsed = parse_model_args(model_args)
    if "pretrained" not in parsed:
        raise UsageError("--model_args needs pretrained=NAME_OR_PATH")
    if parsed.get("dtype", "auto") not in DTYPES:
        raise UsageError(f"--model_args dtype={parsed['dtype']} is not supported; use one of {', '.join(DTYPES)}")
    return parsed


def check_method_flags(args):
    """Refuse flags that contradict each other or that the chosen method (or --fp_only) would ignore."""
    if args.fp_only:
        method, chosen = None, "--fp_only (no quantization)"
    elif quantized_checkpoint(args) is not None:
        method, chosen = None, "a compressed-tensors checkpoint (already quantized)"
    else:
        config = load_config(quant_config_name(args))
        method, chosen = config.method, f"--quant_config {quant_config_name(args)}"
    for name in FLAGS_OF_METHODS:
        if given(args, name) and ignored_by(args, name, method):
            raise UsageError(f"--{name} has no effect with {chosen}; drop one of the two")
    if method == "flatquant":
        check_flat_contradictions(args)


def format_settings(args):
    """The named format's settings (None without one) as the config and the flags that choose its inputs' scales
    make them."""
    block = load_config(quant_config_name(args)).block
    chosen = {name: getattr(args, name) for name in ("format", "input_tensor_scale") if given(args, name)}
    return None if block is None else replace(block, **chosen)


def ignored_by(args, name: str, method: str | None) -> bool:
    block = None if method is None else format_settings(args)
    if block is not None and name in FORMAT_FLAGS:  # a named format's settings, under rtn, gptq or flatquant
        return False
    if block is not None and name in SEARCH_FLAGS:  # read only by the named formats' clip search
        return not block.searches_inputs() if name in INPUT_SEARCH_FLAGS else (
            name not in FORMAT_SEARCH_FLAGS or not block.search)
    if method == "flatquant" and name in SEARCH_FLAGS:  # read only when LLM-FP4's search quantizes the weights
        default = load_config(quant_config_name(args)).flat.weight_quantizer
        return (args.weight_quantizer or ("gptq" if args.gptq else default)) != "fpq_search"
    return method not in FLAGS_OF_METHODS[name]


# FlatQuant flag pairs of which main.py would silently honour only the first
FLAT_OVERRIDES = (("nsamples", "calib_size"), ("matrix_path", "ptq_param_path"), ("reload_matrix", "resume"),
                  ("only_eval", "resume"), ("weight_quantizer", "gptq"))


def check_flat_contradictions(args):
    for first, second in FLAT_OVERRIDES:
        if not (given(args, first) and given(args, second)):
            continue
        a, b = getattr(args, first), getattr(args, second)
        if not ((a == b and not isinstance(a, bool)) or (first, a) == ("weight_quantizer", "gptq")):
            raise UsageError(f"--{first} and --{second} contradict each other (only --{first} would count); "
                             "give one of them")


def check_param_file_settings(args, config):
    """--only_eval on one of our parameter files: the settings that decide how its quantizers run (the FPQ
    pre-shift, the FP numerics) must be the file's; its metadata says which they were."""
    path = Path(args.ptq_param_path or "")
    if config.method == "flatquant" or not (args.only_eval and path.suffix == ".safetensors" and path.is_file()):
        return
    from .params import read_metadata
    saved = read_metadata(path)["config"]
    for name in ("preshift", "fp_numerics"):
        if name in saved and saved[name] != getattr(config, name):
            raise UsageError(f"{path} was calibrated with --{name} {saved[name]}, not {getattr(config, name)}; "
                             f"pass --{name} {saved[name]} to evaluate it")


def check_sequence_lengths(args, model_config, calibrating: bool):
    """The windows must fit the model's positions; run once the model's config is known, before calibration."""
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    positions = getattr(text_config, "max_position_embeddings", None)
    if positions is None:
        return
    lengths = {"ppl_seqlen": args.ppl_seqlen if args.eval_ppl else None,
               "calib_seqlen": args.calib_seqlen if calibrating else None}
    for name, length in lengths.items():
        if length is not None and length > positions:
            raise UsageError(f"--{name} {length} exceeds the model's {positions} positions; "
                             f"pass --{name} {positions} or less")


# what reads the whole model outside its forward, or needs a calibrated block's full-precision weights again
OFFLOAD_REFUSED = {"--plots": "the figures run the whole model",
                   "--model_args use_accelerate=True": "accelerate's device_map places the blocks itself"}
DISK_REFUSED = {"--resume": "the restored blocks' full-precision outputs need weights that a block kept on disk no "
                "longer has"}


def check_offload(args):
    """--offload and --offload_folder against the options they cannot serve (yet), before anything is loaded."""
    if args.offload_folder and args.offload != "disk":
        raise UsageError("--offload_folder is where --offload disk keeps calibrated blocks; add --offload disk or "
                         "drop --offload_folder")
    if args.offload is None:
        return
    model_args = parse_model_args(args.model_args)
    chosen = {**{f"--{name}": value for name, value in vars(args).items()},
              "--model_args use_accelerate=True": model_args.get("use_accelerate", False)}
    refused = {**OFFLOAD_REFUSED, **(DISK_REFUSED if args.offload == "disk" else {})}
    for option, why in refused.items():
        if chosen[option]:
            raise UsageError(f"{option} cannot run with --offload {args.offload} ({why}); drop one of the two")
    if quantized_checkpoint(args) is not None:
        raise UsageError("--offload: a compressed-tensors checkpoint is decoded whole; drop --offload")
    if args.offload_folder:
        check_output_folder(args.offload_folder, "--offload_folder")
    pretrained = model_args["pretrained"]
    if args.offload == "disk" and pretrained not in OFFLINE_MODELS and not Path(pretrained).is_dir():
        raise UsageError(f"--offload disk reads the blocks from a local model folder, and {pretrained} is none; "
                         "download it (safetensors) and pass pretrained=FOLDER")
