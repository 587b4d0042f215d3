"""Sharded data-parallel training (FSDP2, `torch.distributed.fsdp.fully_shard`): every rank holds a slice of each
decoder block's weights, frozen base and experts alike, and gathers a block's full weights only while it runs.

A mixture needs nothing special here: loramix computes every expert densely (the router's gates zero out the
experts a token does not use), so every expert gets a gradient on every rank, and a rank that routes no token to
some expert takes part in the same collectives as the others. Shapes and gradient reduction are FSDP2's.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from loramix.models import decoder_blocks


def shard(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """Shard each decoder block, then the rest (embeddings, head, routers outside the blocks), over `world`
    ranks. The module's parameters become DTensors: build the optimizer afterwards."""
    mesh = init_device_mesh(device.type, (world,))
    for block in decoder_blocks(model, "training.sharding='fsdp'"):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def root_gathered(model: nn.Module):
    """A context in which a sharded model's root group (embeddings, head, routers outside the blocks) stays
    gathered: for calls that bypass the model's own forward, as `generate` does (the blocks gather their own)."""
    if not is_sharded(model):
        yield
        return
    model._get_fsdp_state()._lazy_init()  # what the root's first forward does; a `generate` may come first
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def full(tensor: Tensor) -> Tensor:
    """The whole tensor on every rank (a collective for a sharded one: call it on every rank)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(tensor: Tensor, reference: Tensor) -> Tensor:
    """A whole tensor laid out as `reference` is: this rank's shard where `reference` is sharded."""
    if not isinstance(reference, DTensor):
        return tensor
    return distribute_tensor(tensor.to(reference.device), reference.device_mesh, reference.placements)


def gradient_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """A context for one micro-batch's backward: gradients are reduced across ranks only when `sync` (the
    last micro-batch of a step), as DDP's `no_sync` does."""
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()
