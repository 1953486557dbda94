"""torch.distributed plumbing for ``torchrun``: process group from the environment, DDP wrapping, rank 0.

Outside ``torchrun`` (WORLD_SIZE unset or 1) every function here is a no-op or answers for one process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as td
from torch.nn.parallel import DistributedDataParallel


def init_from_env(cuda: bool | None = None) -> None:
    """Join the process group that ``torchrun`` describes (WORLD_SIZE > 1): NCCL when training on CUDA, gloo
    on CPU (``cuda=False``, e.g. ``train.device: cpu`` on a GPU machine). None: CUDA if available."""
    if td.is_available() and not td.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cuda = torch.cuda.is_available() if cuda is None else cuda
        td.init_process_group(backend="nccl" if cuda else "gloo")


def world_size() -> int:
    return td.get_world_size() if td.is_available() and td.is_initialized() else 1


def rank() -> int:
    return td.get_rank() if td.is_available() and td.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """One GPU per process: cuda:LOCAL_RANK under torchrun."""
    if device.type == "cuda" and world_size() > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def wrap(network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    if world_size() == 1:
        return network
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(network, device_ids=ids)


def from_rank0(value):
    """Rank 0's ``value`` on every rank (a picklable object), e.g. a run name made from the clock."""
    if world_size() == 1:
        return value
    box = [value]
    td.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all ranks, on every rank, on ``tensor``'s device (``tensor``
    itself with one process). A collective: every rank calls it, in the same order, with the same shape and
    dtype; the tensor travels through the current GPU under NCCL, the CPU under gloo."""
    if world_size() == 1:
        return tensor
    device = torch.device("cuda", torch.cuda.current_device()) if td.get_backend() == "nccl" else torch.device("cpu")
    total = tensor.to(device, copy=True)
    td.all_reduce(total)
    return total.to(tensor.device)


def barrier() -> None:
    if world_size() > 1:
        td.barrier()
