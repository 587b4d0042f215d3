"""Training-step speed and memory of loramix routers against peft LoRA, side by side in one process.

    python benchmarks/train_step.py                       # topk vs peft, float32 (the issue's goal: <= 1.15x)
    python benchmarks/train_step.py --variants all        # every router
    python benchmarks/train_step.py --autocast bf16       # loramix under bfloat16 autocast vs peft float32

Each variant is a fresh copy of the model with all attention and MLP linears adapted. Steps (forward,
backward, AdamW) of the variants are interleaved so that machine noise hits them alike; the median step
time is reported. Memory: bytes of the tensors autograd saves for the backward (activations) plus trainable
state (parameters, gradients, AdamW moments); on CUDA also the allocator's peak.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from contextlib import nullcontext

import torch
from loramix.models import load_model
from peft import LoraConfig, get_peft_model

import loramix

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROUTER_VARIANTS = {
    "soft": dict(router="soft"),
    "topk": dict(router="topk"),
    "topk-seq": dict(router="topk", routing_level="sequence"),
    "remix": dict(router="remix", remix_samples=2),
    "task": dict(router="task", num_tasks=5),
    "prompt": dict(router="prompt", top_k=3, expert_rank=8),
    "contrastive": dict(router="topk", contrastive_loss_weight=0.01),
}


def build(variant: str, base: torch.nn.Module, rank: int) -> torch.nn.Module:
    model = copy.deepcopy(base)
    if variant == "peft":
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    settings = dict(num_experts=8, expert_rank=rank // 2, top_k=2, alpha=16.0) | ROUTER_VARIANTS[variant]
    return loramix.wrap(model, loramix.MixLoraConfig(TARGETS, **settings))


def loss_of(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    if isinstance(model, loramix.MixLoraModel):
        return model.compute_loss(batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"][:, 1:].flatten())


def saved_activation_bytes(model: torch.nn.Module, batch: dict, autocast) -> int:
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        loss_of(model, batch)
    return total


def trainable_state_bytes(model: torch.nn.Module) -> int:
    """Parameters + gradients + two AdamW moments of the trainable parameters."""
    return sum(4 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name or path (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--variants", default="topk", help="comma-separated loramix variants, or 'all'")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8, help="peft rank; loramix experts get rank/2 with top-2")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--autocast", choices=["none", "bf16"], default="none", help="autocast for loramix")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    variants = list(ROUTER_VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [v for v in variants if v not in ROUTER_VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(ROUTER_VARIANTS)}")

    base, _ = load_model(args.model, device=device)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, base.config.vocab_size, (args.batch, args.length), generator=generator).to(device)
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": input_ids,
        "task_ids": torch.arange(args.batch, device=device) % 5,
    }
    names = ["peft", *variants]
    models = {name: build(name, base, args.rank).to(device).train() for name in names}
    optimizers = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad]) for n, m in models.items()}

    def autocast_for(name: str):
        if name != "peft" and args.autocast == "bf16":
            return lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)
        return nullcontext

    def step(name: str) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast_for(name)():
            loss = loss_of(models[name], batch)
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up
        step(name)
    for _ in range(args.steps):
        for name in names:
            times[name].append(step(name))

    tokens = args.batch * args.length
    reference = statistics.median(times["peft"])
    print(
        f"device={device} threads={torch.get_num_threads()} batch={args.batch}x{args.length} autocast={args.autocast}"
    )
    print("| variant | active params/token | step s | tokens/s | time vs peft | activations MB | vs peft |")
    print("|---|---|---|---|---|---|---|")
    memory = {
        name: saved_activation_bytes(model, batch, autocast_for(name)) + trainable_state_bytes(model)
        for name, model in models.items()
    }
    for name, model in models.items():
        if isinstance(model, loramix.MixLoraModel):
            active = model.count_parameters()["active_per_token"]
        else:
            active = sum(p.numel() for p in model.parameters() if p.requires_grad)
        median = statistics.median(times[name])
        print(
            f"| {name} | {active:,} | {median:.3f} | {tokens / median:,.0f} | {median / reference:.3f} | "
            f"{memory[name] / 2**20:,.0f} | {memory[name] / memory['peft']:.3f} |"
        )


if __name__ == "__main__":
    main()
