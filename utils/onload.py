"""Layer-by-layer onloading: calibration and evaluation hold one decoder block at a time on the calibration device.

Where the blocks wait is the model's `onloader` (an attribute set when the model is loaded or offloaded):
- `Onloader` (the default): blocks stay where the model put them, on one device or spread over several by
  accelerate's device_map; the hidden states follow each block's device.
- `DeviceOnloader`: blocks wait on their home device (CPU) and are moved to the calibration device, calibrated
  and moved back; the embedding, final norm and lm_head live on the calibration device.
- `DiskOnloader`: the model is a skeleton whose decoder blocks hold meta tensors. A block's tensors are read from
  the checkpoint's safetensors shards right before it is used and dropped afterwards; a calibrated block's
  quantized weights (and its other tensors, which FlatQuant's folding changes) go to a scratch safetensors file
  in the offload folder, from which evaluation reads them back. Only the quantizers, the online transforms and
  the small tensors that are no checkpoint tensor stay in memory.

The block-wise code (utils/pipeline.py, utils/flatquant.py, utils/evaluation.py) asks `onloader_of(model)` for each
block; whole-model callers (lm-eval) run under `onloaded_on_call`, parameter files install through `apply_onloaded`,
and a rotation folded into the weights goes through `rewrite_weights`. This file holds no numerics and knows modules
only as a block's tensors by name.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import weakref
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from quant_layers import QuantLinear

from .adapters import adapter_for
from .errors import UsageError

QUANTIZED = "quantized_weight"  # the scratch file's key suffix of a released linear's weight


def onloader_of(model) -> "Onloader":
    return getattr(model, "onloader", None) or Onloader()


def moved(value, device):
    """A block's call arguments (tensors, tuples of tensors such as the rotary cos/sin, flags) on `device`
    (None: where they are)."""
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(moved(v, device) for v in value)
    if isinstance(value, dict):
        return {k: moved(v, device) for k, v in value.items()}
    return value


def passthrough_forward(hidden_states, *args, **kwargs):
    return hidden_states


class Onloader:
    """Blocks stay where they are; calibration follows each block's device (accelerate's device_map included)."""

    streams = False  # whether blocks are moved in and out (evaluation then runs block by block too)
    keeps_full_precision = True  # whether a calibrated block can still run in full precision (resume needs it)

    @contextmanager
    def onload(self, block: nn.Module, index: int):
        """The block, ready to run, during the `with`; yields the device its inputs must be on."""
        device = next(block.parameters()).device
        yield None if device.type == "meta" else device  # meta: accelerate's offload hooks place the inputs

    @contextmanager
    def capturing(self, blocks: nn.ModuleList):
        """During the capture of the first block's inputs (utils/pipeline.capture_block_inputs)."""
        yield

    def rewrite_weights(self, model, modules, rewrite):
        """rewrite(module) on each module's full-precision weights (a rotation folded into them): here at once."""
        for module in modules:
            rewrite(module)


class StreamingOnloader(Onloader):
    streams = True

    @contextmanager
    def capturing(self, blocks):
        """Blocks that are not onloaded pass their inputs through: the capture only needs block 0's inputs and
        every block's call arguments (masks, positions), which the model computes before the blocks run."""
        for block in blocks:
            block.forward = passthrough_forward
        try:
            yield
        finally:
            for block in blocks:
                del block.forward


class DeviceOnloader(StreamingOnloader):
    """Blocks wait on `home` and are calibrated or run on `device`, one at a time."""

    def __init__(self, device, home="cpu"):
        self.device, self.home = torch.device(device), torch.device(home)

    @contextmanager
    def onload(self, block, index):
        block.to(self.device)
        try:
            yield self.device
        finally:
            block.to(self.home)


@contextmanager
def onloaded_on_call(model, adapter=None):
    """During the `with`, the model's own forward (lm-eval, generate) onloads each decoder block when it reaches
    it and offloads it right after, so whole-model callers hold one block at a time too (one read per block per
    forward: slow from disk, but within memory). A model whose blocks are not moved is left as it is."""
    onloader = onloader_of(model)
    if not onloader.streams:
        yield model
        return
    blocks = model.get_submodule((adapter or adapter_for(model)).layers)
    entered = {}

    def enter(index, block, args, kwargs):
        context = onloader.onload(block, index)
        device = context.__enter__()
        entered[index] = context
        return moved(args, device), moved(kwargs, device)

    def leave(index, block, args, output):
        entered.pop(index).__exit__(None, None, None)

    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(partial(enter, index), with_kwargs=True))
        handles.append(block.register_forward_hook(partial(leave, index), always_call=True))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def apply_onloaded(model, names, apply, adapter=None):
    """apply(name) for each module name (a parameter file's install); one inside a decoder block that waits
    elsewhere is applied while its block is onloaded, one block at a time (a block from disk that now holds
    frozen quantized linears is then kept in its scratch file, as after calibration)."""
    onloader = onloader_of(model)
    layers = (adapter or adapter_for(model)).layers
    by_block = {}
    for name in names:
        inside = onloader.streams and name.startswith(layers + ".")
        if inside:
            by_block.setdefault(int(name[len(layers) + 1:].split(".")[0]), []).append(name)
        else:
            apply(name)
    blocks = model.get_submodule(layers)
    for index, block_names in sorted(by_block.items()):
        with onloader.onload(blocks[index], index):
            for name in block_names:
                apply(name)


def offload_blocks(model, device, adapter=None):
    """Calibrate and evaluate `model` on `device` one decoder block at a time: the blocks stay where they are
    (normally CPU), everything else moves to `device`. Returns the model."""
    adapter = adapter or adapter_for(model)
    home = next(model.get_submodule(adapter.layers).parameters()).device
    move_all_but_blocks(model, adapter.layers, device)
    model.onloader = DeviceOnloader(device, home)
    return model


def move_all_but_blocks(model, layers: str, device):
    """model.to(device) except the decoder blocks (tied weights stay tied)."""
    parent_path, _, name = layers.rpartition(".")
    parent = model.get_submodule(parent_path)
    blocks = getattr(parent, name)
    setattr(parent, name, nn.ModuleList())
    try:
        model.to(device)
    finally:
        setattr(parent, name, blocks)


# ----- disk -----
def checkpoint_files(folder: Path) -> dict[str, Path]:
    """{tensor name: shard} of a safetensors checkpoint folder (one file or an index of shards)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / shard for name, shard in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise UsageError(f"--offload disk reads safetensors shards, and {folder} has none; convert the checkpoint "
                         "to safetensors or drop --offload disk")
    with safe_open(str(single), "pt") as f:
        return {name: single for name in f.keys()}


def read_tensors(files: dict[str, Path], names) -> dict[str, torch.Tensor]:
    """The named checkpoint tensors, one shard opened at a time."""
    by_shard = {}
    for name in names:
        by_shard.setdefault(files[name], []).append(name)
    out = {}
    for shard, shard_names in by_shard.items():
        with safe_open(str(shard), "pt") as f:
            out.update({name: f.get_tensor(name) for name in shard_names})
    return out


def set_tensor(module: nn.Module, path: str, tensor: torch.Tensor):
    """Put `tensor` at `path` (relative to `module`) as the parameter or buffer it replaces. A released linear's
    quantized weight is also its weight, as QuantLinear.release_original leaves it."""
    owner_path, _, attr = path.rpartition(".")
    owner = module.get_submodule(owner_path)
    if attr == QUANTIZED:
        owner.quantized_weight = tensor
        owner.release_original()
    elif isinstance(getattr(owner, attr), nn.Parameter):
        setattr(owner, attr, nn.Parameter(tensor, requires_grad=False))
    else:
        setattr(owner, attr, tensor)


def stored_tensor(module: nn.Module, attr: str) -> torch.Tensor:
    """module.<attr>, read back from the scratch file when its block is on disk (GPTQ's codes are written from
    the quantized weights)."""
    tensor = getattr(module, attr)
    if tensor.device.type != "meta":
        return tensor
    path, key = module.stored_at[attr]
    with safe_open(str(path), "pt") as f:
        return f.get_tensor(key)


class DiskOnloader(StreamingOnloader):
    """Decoder blocks live in the checkpoint's shards (and, once calibrated, in scratch files under `folder`)."""

    keeps_full_precision = False  # a calibrated block's scratch file holds its quantized weights only

    def __init__(self, checkpoint: Path, layers: str, dtype: torch.dtype, device, folder=None, check=None):
        self.files = checkpoint_files(Path(checkpoint))
        self.layers, self.dtype, self.device = layers, dtype, torch.device(device)
        self.check = check  # called on the (name, tensor) pairs of every block read from the checkpoint
        if folder is None:
            folder = tempfile.mkdtemp(prefix="llm-fp4-offload-")
            weakref.finalize(self, shutil.rmtree, folder, True)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.stored: set[int] = set()
        self.rewrites: dict[int, list] = {}  # block index -> [(module, rewrite)] run whenever read from the checkpoint

    def block_names(self, index: int) -> list[str]:
        """The block's checkpoint tensors, relative to the block."""
        prefix = f"{self.layers}.{index}."
        return [name[len(prefix):] for name in self.files if name.startswith(prefix)]

    def scratch(self, index: int) -> Path:
        return self.folder / f"block_{index}.safetensors"

    def leading_values(self, name: str, count: int) -> torch.Tensor:
        """The first `count` values of a checkpoint tensor, flattened, in the model's dtype, reading only the rows
        that hold them (model_fingerprint reads the blocks' this way, not the whole checkpoint)."""
        with safe_open(str(self.files[name]), "pt") as f:
            part = f.get_slice(name)
            shape = part.get_shape()
            if not shape:
                return f.get_tensor(name).flatten().to(self.dtype)
            row = math.prod(shape[1:]) or 1
            return part[:-(-count // row)].flatten()[:count].to(self.dtype)

    def rewrite_weights(self, model, modules, rewrite):
        """A module inside a block on disk is rewritten each time its block is read from the checkpoint."""
        pending = {id(module): module for module in modules}
        for index, block in enumerate(model.get_submodule(self.layers)):
            for module in block.modules():
                if id(module) in pending:
                    self.rewrites.setdefault(index, []).append((pending.pop(id(module)), rewrite))
        super().rewrite_weights(model, pending.values(), rewrite)

    @contextmanager
    def onload(self, block, index):
        if index in self.stored:
            with safe_open(str(self.scratch(index)), "pt") as f:
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        else:
            prefix = f"{self.layers}.{index}."
            read = read_tensors(self.files, [prefix + name for name in self.block_names(index)])
            if self.check is not None:
                self.check(read.items())
            tensors = {name[len(prefix):]: tensor.to(self.dtype) for name, tensor in read.items()}
            del read
        for key, tensor in tensors.items():
            set_tensor(block, key, tensor.to(self.device))
        del tensors
        if index not in self.stored:
            for module, rewrite in self.rewrites.get(index, []):
                rewrite(module)
        try:
            yield self.device
            # a block holding wrapped linears was calibrated: from now on it is read from its scratch file
            if index not in self.stored and any(isinstance(m, QuantLinear) for m in block.modules()):
                self.store(block, index)
        finally:
            self.drop(block, index)

    def resident_state(self, block, index) -> dict[str, torch.Tensor]:
        """The block's tensors that come from the checkpoint, a calibrated linear's as its quantized weight."""
        state = {}
        for name in self.block_names(index):
            owner_path, _, attr = name.rpartition(".")
            owner = block.get_submodule(owner_path)
            if isinstance(owner, QuantLinear) and attr == "weight" and owner.quantized_weight is not None:
                if not owner.released:  # the full-precision weight is not kept: the block only runs quantized
                    owner.release_original()
                state[f"{owner_path}.{QUANTIZED}"] = owner.quantized_weight
            else:
                state[name] = getattr(owner, attr)
        return state

    def store(self, block, index):
        """Write a calibrated block to its scratch file; the quantizers stay in memory."""
        state = self.resident_state(block, index)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(self.scratch(index)))
        for key in state:
            owner_path, _, attr = key.rpartition(".")
            owner = block.get_submodule(owner_path)
            owner.stored_at = {**getattr(owner, "stored_at", {}), attr: (self.scratch(index), key)}
        self.stored.add(index)

    def drop(self, block, index):
        """Replace the block's resident tensors by meta tensors of the same shape and dtype."""
        for key, tensor in self.resident_state(block, index).items():
            set_tensor(block, key, tensor.to("meta"))


def load_offloaded(folder, dtype: torch.dtype | str, device, offload_folder=None, adapter=None, check=None):
    """The model of the safetensors checkpoint `folder` with its decoder blocks left on disk (meta tensors
    until onloaded); the embedding, final norm and lm_head are read onto `device`. dtype "auto": the
    checkpoint's. `check(named tensors)` sees every block's tensors as they are read (utils/models.py refuses
    non-finite weights with it)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    if dtype == "auto":
        saved = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, saved) if isinstance(saved, str) else saved
    with init_empty_weights():  # buffers (rotary frequencies) are made for real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = adapter or adapter_for(model)
    onloader = DiskOnloader(folder, adapter.layers, dtype, device, offload_folder, check)
    rest = [name for name in onloader.files if not name.startswith(f"{adapter.layers}.")]
    for name, tensor in read_tensors(onloader.files, rest).items():
        set_tensor(model, name, tensor.to(dtype))
    if getattr(config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    move_all_but_blocks(model, adapter.layers, device)
    model.eval()
    model.requires_grad_(False)
    model.onloader = onloader
    return model
