"""Export of a quantized model as a compressed-tensors checkpoint (what transformers and vLLM load).

Only what the format holds exactly is written: the named formats NVFP4, MXFP4, their weight-only variants and INT4
in groups (utils/compressed_tensors_io.EXPORTS), with the engines' own input quantization. Everything else is
refused before any calibration work, naming the configs that export. The folder is written next to its target
and renamed into place; an existing folder is replaced only when it is an earlier export of the same model and
config (its `quantization_source.json` says which).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from configs import QuantConfig, available, load_config
from quant_layers import QuantEmbedding, QuantLinear
from quant_layers.blocks import BlockQuantizer
from quant_layers.schemes import preset

from .compressed_tensors_io import EXPORTS, e8m0_codes, int_pack, pack_nibbles
from .adapters import adapter_for
from .errors import UsageError
from .files import atomic_write_folder, check_output_folder
from .onload import onloader_of

SOURCE_FILE = "quantization_source.json"  # which model and config an export holds
MAX_SHARD_SIZE = "4GB"


# ----- what exports, decided before any work -----
def export_refusal(config: QuantConfig) -> str | None:
    """Why `config` cannot be written exactly as a compressed-tensors checkpoint, or None when it can."""
    if config.block is None:
        return ("its formats (E1M2/E3M0 elements, real-valued per-row exponent biases and pre-shifts, FlatQuant's "
                "online transforms) have no compressed-tensors layout")
    if config.flat is not None:
        return "FlatQuant's online Kronecker transforms of the inputs have no compressed-tensors layout"
    settings = config.block
    if settings.format not in EXPORTS:
        return f"compressed-tensors has no packed layout for {settings.format} here"
    if settings.hadamard:
        return "its Hadamard rotation of the inputs would need an online transform"
    if config.quantize_embedding:
        return "its quantized embedding table (keep it in full precision: --ignore embedding)"
    _, inputs = settings.schemes()
    if inputs is not None and inputs.rule not in ("", "even"):
        return f"the engines compute MX input scales by the 'even' rule, not --mx_rule {inputs.rule}"
    if inputs is not None and inputs.tensor_scale == "dynamic":
        return "the engines use a calibrated NVFP4 input tensor scale, not --input_tensor_scale dynamic"
    if inputs is not None and inputs.four_over_six:
        return "the engines map every NVFP4 input block to 6, not four over six (--four_over_six_inputs)"
    return None


def exportable_configs() -> list[str]:
    return [name for name in available() if export_refusal(load_config(name)) is None]


def check_exportable(config: QuantConfig):
    reason = export_refusal(config)
    if reason is not None:
        raise UsageError(f"--save_compressed: {config.name} cannot be written exactly as a compressed-tensors "
                         f"checkpoint ({reason}); configs that export: {', '.join(exportable_configs())}")


def export_identity(model_name: str, config: QuantConfig | None, format_name: str) -> dict:
    """What an export folder holds, compared when the folder already exists."""
    identity = {"model": str(model_name), "format": format_name, "config": config.to_dict() if config else None}
    return json.loads(json.dumps(identity))  # tuples as lists, as read back


def check_export_folder(folder, identity: dict):
    """An existing folder is only replaced when it is an earlier export of the same model and config."""
    folder = Path(folder)
    check_output_folder(folder, "--save_compressed")
    if not folder.exists() or not any(folder.iterdir()):
        return
    source = folder / SOURCE_FILE
    previous = json.loads(source.read_text(encoding="utf-8")) if source.is_file() else None
    if previous != identity:
        what = "another model or config" if previous else "files that are not an export of this toolkit"
        raise UsageError(f"--save_compressed {folder} holds {what}; choose another folder")


def check_export_target(folder, model_name: str, config: QuantConfig):
    """--save_compressed, before the model loads: the config exports and the folder may take it."""
    check_exportable(config)
    check_export_folder(folder, export_identity(model_name, config, config.block.format))


# ----- the model's quantized modules -----
def module_format(path: str, module: QuantLinear) -> str:
    """The named format of a quantized linear, when the engines compute exactly what it does."""
    if module.input_transform is not None or module.input_shift is not None:
        raise UsageError(f"{path} reads transformed or shifted inputs, which compressed-tensors cannot hold; "
                         f"configs that export: {', '.join(exportable_configs())}")
    weight = module.weight_quantizer.spec()
    inputs = None if module.act_quantizer is None else module.act_quantizer.spec()
    for name in EXPORTS:
        wanted_weight, wanted_inputs = preset(name)
        # an MX weight's rule only chose its powers of two: any rule is stored exactly
        any_rule = weight.scale == wanted_weight.scale == "e8m0" and replace(weight, rule=wanted_weight.rule)
        if wanted_weight in (weight, any_rule) and inputs == wanted_inputs:
            return name
    raise UsageError(f"{path}: weights {weight.name}, inputs {inputs.name if inputs else 'unquantized'} have no "
                     f"exact compressed-tensors layout; configs that export: {', '.join(exportable_configs())}")


def quantized_linears(model) -> tuple[dict[str, QuantLinear], str]:
    """({path: quantized linear}, their one format); refuses a quantized embedding or mixed formats."""
    modules, formats = {}, set()
    for path, module in model.named_modules():
        if isinstance(module, QuantEmbedding) and module.quantize and module.weight_quantizer is not None:
            raise UsageError(f"{path}: a quantized embedding table has no compressed-tensors layout that "
                             "transformers loads; quantize with the embedding in full precision")
        if isinstance(module, QuantLinear) and module.quantize and module.weight_quantizer is not None:
            modules[path] = module
            formats.add(module_format(path, module))
    if len(formats) != 1:
        raise UsageError(f"export needs a model quantized in one named format, found {sorted(formats) or 'none'}")
    return modules, formats.pop()


# ----- tensors and config -----
def packed_tensors(module: QuantLinear) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one quantized linear, from its quantizer's codes; refuses a weight
    that its codes do not reproduce bit for bit."""
    quantizer, weight = module.weight_quantizer, module.quantized_weight
    codes, ranges = quantizer.encode(weight.float())
    if not torch.equal(quantizer.decode(codes, ranges).to(weight.dtype), weight):
        raise ValueError("a quantized weight is not on its quantizer's grid; it cannot be exported exactly")
    if not isinstance(quantizer, BlockQuantizer):  # INT groups: scale [out, in / group]
        return {"weight_packed": int_pack(codes, quantizer.bits), "weight_scale": ranges["scale"].squeeze(-1).float(),
                "weight_shape": torch.tensor(list(weight.shape))}
    tensors = {"weight_packed": pack_nibbles(codes)}
    if quantizer.encoding == "e8m0":
        tensors["weight_scale"] = e8m0_codes(ranges["scale"])
    else:
        tensors["weight_scale"] = ranges["scale"].to(torch.float8_e4m3fn)
        tensors["weight_global_scale"] = ranges["tensor_scale"].reshape(1).float()
        if module.act_quantizer is not None:
            tensors["input_global_scale"] = module.act_quantizer.tensor_scale.reshape(1).float()
    return tensors


def checkpoint_tensors(model, quantized: dict[str, QuantLinear], root: str = "",
                       leave_out: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of `model` (or of its submodule `root`, less the submodule `leave_out`) under their transformers
    names, quantizer buffers left out, each quantized linear's weight replaced by its packed tensors."""
    module = model.get_submodule(root) if root else model
    prefix = f"{root}." if root else ""
    outside = (lambda key: not key.startswith(f"{leave_out}.")) if leave_out else (lambda key: True)
    wrappers = [prefix + path for path, m in module.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    tensors = {}
    for key, value in module.state_dict().items():
        key = prefix + key
        owner, _, leaf = key.rpartition(".")
        wrapper = next((path for path in wrappers if key.startswith(path + ".")), None)
        if not outside(key) or (wrapper is not None and (owner != wrapper or leaf not in ("weight", "bias"))):
            continue  # another part's, or a quantizer's or transform's buffer
        if owner in quantized and leaf == "weight":
            continue
        tensors[key] = value.contiguous()
    for path, linear in quantized.items():
        if path.startswith(prefix) and outside(path + "."):
            tensors.update({f"{path}.{name}": value for name, value in packed_tensors(linear).items()})
    return tensors


def write_block_by_block(model, quantized: dict, outside: dict, folder: Path):
    """The shards of a model whose decoder blocks are onloaded one at a time (utils/onload.py): the tensors outside
    the blocks in one shard, then one shard per block, packed while the block is onloaded; with the index."""
    onloader, layers = onloader_of(model), adapter_for(model).layers
    blocks = model.get_submodule(layers)
    count, weight_map, total = len(blocks) + 1, {}, 0

    def write(number: int, tensors: dict):
        nonlocal total
        name = f"model-{number:05d}-of-{count:05d}.safetensors"
        save_file({k: v.detach().cpu() for k, v in tensors.items()}, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(v.numel() * v.element_size() for v in tensors.values())

    write(1, outside)
    for index, block in enumerate(blocks):
        with onloader.onload(block, index):
            write(index + 2, checkpoint_tensors(model, quantized, f"{layers}.{index}"))
    index_file = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2), encoding="utf-8")
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)


def path_of(model, module: nn.Module) -> str:
    return next(path for path, m in model.named_modules() if m is module)


def tie_embeddings(model, quantized: dict, tensors: dict) -> bool:
    """Whether the written model ties lm_head to the embedding table as transformers expects: it does when
    lm_head stays in full precision and equals the table (calibration unties them but leaves them equal); its
    weight is then left out of the file. A quantized lm_head is written untied, next to the full table."""
    head, table = model.get_output_embeddings(), model.get_input_embeddings()
    head_path = path_of(model, head)
    if head_path in quantized or not torch.equal(head.weight, table.weight):
        return False
    del tensors[f"{head_path}.weight"]
    return True


def linear_paths(model) -> list[str]:
    return [path for path, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))]


def quantization_config(format_name: str, ignore: list[str]) -> dict:
    """config.json's `quantization_config`, built by compressed-tensors' own classes from its preset scheme."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
    scheme_name, compression = EXPORTS[format_name]
    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(scheme_name, ["Linear"])},
                                format=compression, quantization_status="compressed", ignore=ignore)
    return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
            "sparsity_config": {}, "transform_config": {}, **config.model_dump(exclude=["quant_method"], mode="json")}


def export(model, folder, tokenizer=None, config: QuantConfig | None = None, *, model_name: str | None = None,
           max_shard_size: str = MAX_SHARD_SIZE) -> Path:
    """Write the quantized `model` (NVFP4, MXFP4, NVFP4A16, MXFP4A16 or INT4 groups) as a compressed-tensors
    HF folder: config.json with its quantization_config, safetensors shards, generation config, tokenizer.
    `config` and `model_name` (default: the model's name_or_path) name what the folder holds."""
    if config is not None:
        check_exportable(config)
    quantized, format_name = quantized_linears(model)
    identity = export_identity(model_name or getattr(model, "name_or_path", ""), config, format_name)
    check_export_folder(folder, identity)
    streamed = onloader_of(model).streams  # blocks elsewhere: packed and written one block at a time
    tensors = checkpoint_tensors(model, quantized, leave_out=adapter_for(model).layers if streamed else None)
    ignore = [path for path in linear_paths(model) if path not in quantized]
    tie = tie_embeddings(model, quantized, tensors)

    def write(temporary: Path):
        if streamed:
            write_block_by_block(model, quantized, tensors, temporary)
        else:
            model.save_pretrained(temporary, state_dict=tensors, max_shard_size=max_shard_size)
        config_file = temporary / "config.json"
        written = json.loads(config_file.read_text(encoding="utf-8"))
        written["quantization_config"] = quantization_config(format_name, ignore)
        for section in (written, written.get("text_config")):
            if section is not None:
                section["tie_word_embeddings"] = tie
        config_file.write_text(json.dumps(written, indent=2, sort_keys=True), encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(temporary)
        (temporary / SOURCE_FILE).write_text(json.dumps(identity, indent=2), encoding="utf-8")
    return atomic_write_folder(folder, write)
