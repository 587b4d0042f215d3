"""The weights each rank holds, and the step time, when the default model trains on 2 processes with its weights
copied to each (DDP, `training.sharding: none`) or sharded over them (FSDP2, `training.sharding: fsdp`).

    torchrun --nproc-per-node 2 benchmarks/sharded.py      # OMP_NUM_THREADS=1 on a 2-core machine

Printed by rank 0: the parameter bytes one rank holds (frozen base, experts and routers) and the median seconds
of a `topk` training step (8 experts of rank 4, top-2, all linear layers, a batch of 2 x 64 tokens per rank).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import loramix
from loramix.models import DEFAULT_MODEL, load_model
from loramix.sharding import shard
from loramix.train import LossModule


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this rank stores (its shards, for sharded ones)."""
    total = 0
    for parameter in model.parameters():
        local = parameter.to_local() if isinstance(parameter, DTensor) else parameter
        total += local.numel() * local.element_size()
    return total


def step_seconds(sharding: str, model_name: str, steps: int, rank: int, world: int) -> tuple[int, float]:
    torch.manual_seed(0)
    base, _ = load_model(model_name)
    config = loramix.MixLoraConfig("all-linear", router="topk", num_experts=8, expert_rank=4, top_k=2)
    model = loramix.wrap(base, config).train()
    runner: torch.nn.Module = LossModule(model)
    if sharding == "fsdp":
        shard(model, torch.device("cpu"), world)
    else:
        runner = DistributedDataParallel(runner)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(100, 40000, (2, 64), generator=torch.Generator().manual_seed(rank))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    times = []
    for _ in range(steps + 1):  # the first step is not timed
        dist.barrier()
        started = time.perf_counter()
        runner(batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
    return held_bytes(model), statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {sharding: step_seconds(sharding, args.model, args.steps, rank, world) for sharding in ("none", "fsdp")}
    if rank == 0:
        copied = results["none"][0]
        print(f"| {world} processes, `training.sharding` | weights held per rank MB | vs copied | s/step |")
        print("|---|---:|---:|---:|")
        for sharding, (held, seconds) in results.items():
            print(f"| {sharding} | {held / 2**20:.0f} | {held / copied:.2f}x | {seconds:.2f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
