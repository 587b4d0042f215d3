"""The processes of a run launched by torchrun (or accelerate launch): joining the process group, and the values
every rank must agree on (a finite loss, the time spent, per-rank state gathered for a checkpoint)."""

from __future__ import annotations

import inspect
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

# Buffers (routing statistics, contrastive memory queues) stay local to each rank after the start;
# torch 2.13 renamed DDP's option.
RANK_LOCAL_BUFFERS = (
    "forward_sync_buffers"
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else "broadcast_buffers"
)


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when launched by torchrun / accelerate launch
    (gloo on CPU, nccl on CUDA), once per process: the caller owns it (the CLI destroys it at the end)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not torch.cuda.is_available():
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def device_name(device: torch.device) -> str:
    """What trained a run, for its training.json: the GPU's name (for example "NVIDIA H200"), else the CPU threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def all_finite(value: torch.Tensor, world: int) -> bool:
    """Whether the value is finite on every rank (so that all ranks stop together)."""
    flag = torch.isfinite(value.detach()).all().to(torch.float32).reshape(1)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def slowest(seconds: float, world: int) -> float:
    """The largest of the ranks' values (seconds spent), on every rank."""
    if world == 1:
        return seconds
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value.item())


def gather(value: object, world: int) -> list:
    """A picklable value from every rank, on every rank (in memory; nothing is pickled to disk)."""
    if world == 1:
        return [value]
    values = [None] * world
    dist.all_gather_object(values, value)
    return values
