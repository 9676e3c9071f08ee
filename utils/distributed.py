"""Data-parallel calibration: under an initialised torch.distributed process group every process (rank) calibrates on
its own share of the calibration windows, and what the methods accumulate over tokens (Gram matrices, Hessians,
input maxima, search losses, FlatQuant's gradients) is reduced across the ranks, so every rank ends with the same
parameters. Without a process group (or with one process) every function here is the identity.

Windows are dealt round-robin (rank r holds windows r, r + W, r + 2W, ...), so a batch of consecutive windows is
split evenly over the ranks and the i-th local batch of every rank together is the single-process i-th batch.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from quant_layers.search import TokenSplit

from .errors import UsageError

MAXIMUM, MINIMUM = dist.ReduceOp.MAX, dist.ReduceOp.MIN


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """The rank that writes files and prints results."""
    return rank() == 0


def start_from_environment(device: str) -> str:
    """Join the process group `torchrun` describes in the environment (WORLD_SIZE > 1): NCCL on GPUs, each rank on
    its LOCAL_RANK device, gloo on CPU. Returns the device this rank calibrates on."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(hours=2))
    return device


def stop():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_windows(windows: int):
    """Refuse, before any work, a calibration set that the ranks cannot share evenly."""
    if windows % world_size():
        raise UsageError(f"{windows} calibration windows do not split over {world_size()} processes; pass a "
                         f"--calib_size (or --nsamples) divisible by {world_size()}")


def local_windows(samples: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's calibration windows of `samples` [N, T] (all of them without a process group)."""
    if samples is None or not active():
        return samples
    check_windows(samples.shape[0])
    return samples[rank()::world_size()]


def local_batch(batch: int) -> int:
    """The windows per training step on each rank for a global batch of `batch` windows."""
    if batch % world_size():
        raise UsageError(f"a batch of {batch} windows does not split over {world_size()} processes; pass a "
                         f"--cali_bsz divisible by {world_size()}")
    return batch // world_size()


def reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """`tensor` combined over the ranks (sum, MAXIMUM or MINIMUM), in its own dtype; the tensor itself without a
    process group. gloo and NCCL send every rank the same reduced values, which keeps the ranks' searches in step."""
    if not active():
        return tensor
    wide = tensor.dtype if tensor.dtype in (torch.float32, torch.float64) else torch.float64  # bf16 maxima exactly
    work = tensor.detach().to(_backend_device(), wide, copy=True)
    dist.all_reduce(work, op)
    return work.to(tensor.device, tensor.dtype)


def _backend_device() -> torch.device:
    """NCCL reduces GPU tensors only (counts and losses may live on the CPU); gloo reduces CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def maximum(tensor: torch.Tensor) -> torch.Tensor:
    return reduce(tensor, MAXIMUM)


def total(value: int | float) -> int | float:
    """A number summed over the ranks (token counts, losses)."""
    return type(value)(reduce(torch.tensor(value, dtype=torch.float64)).item()) if active() else value


def token_split(tokens: int, window: int) -> TokenSplit:
    """How this rank's `tokens` flattened calibration tokens (windows of `window` tokens, dealt round-robin) lie
    among all ranks' tokens, with the reductions the numerics apply to their sums and maxima."""
    if not active():
        return TokenSplit()
    local = torch.arange(tokens)
    positions = ((local // window) * world_size() + rank()) * window + local % window
    return TokenSplit(total=total(tokens), positions=positions, sum=reduce, max=maximum)


def sum_gradients(parameters):
    """Sum every parameter's gradient over the ranks (the loss was already divided so that the sum is the
    single-process gradient)."""
    if not active():
        return
    for parameter in parameters:
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)


def input_maxima(inputs: torch.Tensor, split: TokenSplit) -> torch.Tensor:
    """What a MinMax input quantizer reads of inputs [tokens, in]: the inputs themselves, or under a data-parallel
    `split` [1, in] each channel's |x| maximum over every rank's tokens (the same per-tensor and per-channel
    maxima, in the inputs' dtype)."""
    if split.total is None:
        return inputs
    return split.max(inputs.detach().abs().amax(0, keepdim=True))
