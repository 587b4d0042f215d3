"""Training-step speed, memory and FLOP rate of loramix routers against peft LoRA, side by side in one process.

    python benchmarks/train_step.py                                  # topk vs peft, float32 (goal: <= 1.15x)
    python benchmarks/train_step.py --variants all --autocast none,bf16 --steps 3   # every router, both precisions
    python benchmarks/train_step.py --variants topk,prompt --compile   # every model's blocks compiled (inductor)

Each variant is a fresh copy of the model with all attention and MLP linears adapted, at the same activated
rank as peft's LoRA: the expert rank is chosen so that the LoRA parameters one token activates equal peft's
(rank 8: 8 of 8 rank-1 experts for the dense routers, 2 of 8 rank-4 experts for the top-2 routers, 3 of 7
rank-19 modules for MiLoRA's prompt router). Steps (forward, backward, AdamW) of the variants are
interleaved so that machine noise hits them alike; the median step time is reported.

Memory: bytes of the tensors autograd saves for the backward (activations: each storage once, not the model's
parameters or buffers that it saves by reference) plus trainable state (parameters, gradients, AdamW moments); on
CUDA also the allocator's peak during a step above what the models hold.

FLOPs of one step (frozen base, T tokens, B' sequences of S tokens, T = B' S):
    T (4 N_frozen + 6 P_trainable) + 4 T_head d V + 12 L B' S^2 d_attn
4 N_frozen T: forward 2 N T and backward through the frozen linears 2 N T (input gradients only, no weight
gradients); 6 P T: forward, input and weight gradients of the adapter (every expert: dispatch is dense);
4 T_head d V: the output head on the positions whose logits are computed; 12 L B' S^2 d_attn: attention
scores and values, forward (4) and backward (8), counted over the full S x S (the causal mask is not
subtracted). ReMix's batch is replicated M times, so B' = M B. The rate is set against the measured peak of
large square `torch.matmul` on the same machine.

Operators: the ATen operators one step dispatches (forward, backward, optimiser), counted in one extra step.
On a GPU each costs a kernel launch or at least the framework's per-operator overhead, so at small batches a
step's time follows this count rather than its FLOPs; it is the same on every machine. With `--compile` every
model, peft's included, has its decoder blocks compiled (`loramix.compilation.compile_blocks`, compiled in the
warm-up step); operators are then not counted (a dispatch mode cannot run compiled code).
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

import loramix
from loramix.compilation import compile_blocks
from loramix.models import load_model
from loramix.targets import find_targets, linear_features, linear_layer_names

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROUTER_VARIANTS = {
    "soft": dict(router="soft"),
    "topk": dict(router="topk"),
    "topk-seq": dict(router="topk", routing_level="sequence"),
    "remix": dict(router="remix", remix_samples=2),
    "task": dict(router="task", num_tasks=5),
    "prompt": dict(router="prompt", top_k=3),
    "contrastive": dict(router="topk", contrastive_loss_weight=0.01),
}
TOKEN_LEVEL = ("soft", "topk", "remix", "contrastive")
PRECISIONS = {"none": None, "bf16": torch.bfloat16}
PEAK_NAMES = {"none": "float32", "bf16": "bf16"}


# ---- matching the activated rank -------------------------------------------------------------------------------
def lora_parameters(
    model: torch.nn.Module, target_modules: list[str] | str, rank: int, layers: list[int] | None = None
) -> int:
    """Parameters of a plain rank-`rank` LoRA on the target linears (of decoder layers `layers`, None: all):
    rank * sum(d_in + d_out)."""
    targets = find_targets(model, target_modules, layers)
    return rank * sum(sum(linear_features(model.get_submodule(name))) for name in targets)


def expert_parameters_per_token(model: loramix.MixLoraModel) -> int:
    """LoRA-expert parameters one token activates (the routers' own parameters left out)."""
    routers = {id(r): r for r in model.routers().values()}.values()
    return model.count_parameters()["active_per_token"] - sum(r.active_parameters() for r in routers)


def matched_expert_rank(base: torch.nn.Module, config: loramix.MixLoraConfig, target: int) -> int:
    """The expert rank whose activated expert parameters per token come closest to `target` (peft's count)."""
    probe = loramix.wrap(base, loramix.MixLoraConfig.from_dict(config.to_dict() | {"expert_rank": 1}))
    per_rank = expert_parameters_per_token(probe)
    probe.unload()
    return max(1, round(target / per_rank))


# ---- building and stepping -----------------------------------------------------------------------------------
def build(variant: str, base: torch.nn.Module, rank: int) -> torch.nn.Module:
    """A copy of `base` with peft LoRA of `rank`, or with a loramix variant at the same activated rank."""
    model = copy.deepcopy(base)
    if variant == "peft":
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    config = loramix.MixLoraConfig(TARGETS, **dict(num_experts=8, top_k=2, alpha=16.0) | ROUTER_VARIANTS[variant])
    expert_rank = matched_expert_rank(model, config, lora_parameters(model, TARGETS, rank))
    return loramix.wrap(model, loramix.MixLoraConfig.from_dict(config.to_dict() | {"expert_rank": expert_rank}))


def loss_of(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    if isinstance(model, loramix.MixLoraModel):
        return model.compute_loss(batch)
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    logits = model(**inputs, use_cache=False).logits[:, :-1]  # as loramix's compute_loss: no key-value cache
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"][:, 1:].flatten())


def operators_cell(result: dict) -> str:
    if result["operators"] is None:
        return "— | —"
    return f"{result['operators']:,} | {result['operators_vs_peft']:.2f}"


def saved_activation_bytes(model: torch.nn.Module, batch: dict, autocast) -> int:
    """Bytes of the tensors autograd saves for the backward, each storage once, leaving out the storages of the
    model's parameters and buffers (a frozen weight or a memory queue saved by reference costs nothing more)."""
    held = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: set[int] = set()
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in held and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        loss_of(model, batch)
    return total


def trainable_state_bytes(model: torch.nn.Module) -> int:
    """Parameters + gradients + two AdamW moments of the trainable parameters."""
    return sum(4 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


class OperatorCount(TorchDispatchMode):
    """Counts the ATen operators dispatched while active (autograd's backward included), by name."""

    def __init__(self) -> None:
        super().__init__()
        self.by_name: collections.Counter = collections.Counter()

    @property
    def count(self) -> int:
        return sum(self.by_name.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.by_name[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


# ---- FLOPs and the machine's peak ----------------------------------------------------------------------------
def replication(model: torch.nn.Module) -> int:
    """How many times the model's training loss repeats the batch (ReMix's M routing samples)."""
    if isinstance(model, loramix.MixLoraModel) and model.mixlora_config.router == "remix":
        return model.mixlora_config.remix_samples
    return 1


def step_flops(model: torch.nn.Module, base: torch.nn.Module, batch: dict) -> float:
    """FLOPs of one training step by the module docstring's formula."""
    config = base.config
    sequences = batch["input_ids"].shape[0] * replication(model)
    length = batch["input_ids"].shape[1]
    tokens = sequences * length
    head = base.get_output_embeddings()
    frozen = sum(base.get_submodule(name).weight.numel() for name in linear_layer_names(base))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if isinstance(model, loramix.MixLoraModel):  # logits only where a label is predicted
        head_tokens = int((batch["labels"][:, 1:] != -100).sum()) * replication(model)
    else:
        head_tokens = tokens
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention_width = config.num_attention_heads * head_dim
    attention = 12 * config.num_hidden_layers * sequences * length**2 * attention_width
    return tokens * (4 * frozen + 6 * trainable) + 4 * head_tokens * head.weight.numel() + attention


def matmul_peak(dtype: torch.dtype, device: str, size: int = 2048, repeats: int = 5) -> float:
    """The best FLOP/s of `torch.matmul` of two size x size matrices of `dtype` over `repeats` tries."""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


# ---- the benchmark -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name or path (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--variants", default="topk", help="comma-separated loramix variants, or 'all'")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8, help="peft rank; every variant activates as many ranks")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant (after one warm-up)")
    parser.add_argument(
        "--autocast", default="none", help="comma-separated precisions of loramix (and peft): none, bf16"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--peak-size", type=int, default=2048, help="size of the products that measure the peak")
    parser.add_argument("--compile", action="store_true", help="compile every model's decoder blocks (inductor)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    variants = list(ROUTER_VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [v for v in variants if v not in ROUTER_VARIANTS]
    precisions = args.autocast.split(",")
    if unknown or any(p not in PRECISIONS for p in precisions):
        parser.error(
            f"unknown variants {unknown} or precisions {precisions}; known: {list(ROUTER_VARIANTS)}, none, bf16"
        )

    base, _ = load_model(args.model, device=device)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, base.config.vocab_size, (args.batch, args.length), generator=generator).to(device)
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": input_ids,
        "task_ids": torch.arange(args.batch, device=device) % 5,
    }
    models = {name: build(name, base, args.rank).to(device).train() for name in ["peft", *variants]}
    if args.compile:
        torch._dynamo.config.recompile_limit = 64  # every variant's blocks compile the same code
        for model in models.values():
            if not compile_blocks(model):
                parser.error("--compile: inductor cannot compile on this machine (see the warning)")
    # peft in float32 is the reference of every ratio; then each precision's variants
    runs = [("peft", "none")] + [(n, p) for p in precisions for n in models if (n, p) != ("peft", "none")]
    # the multi-tensor AdamW (CUDA's default) everywhere, so that the operator counts are the same on every device
    optimizers = {
        n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], foreach=True) for n, m in models.items()
    }

    def autocast_for(precision: str):
        dtype = PRECISIONS[precision]
        return nullcontext if dtype is None else lambda: torch.autocast(device_type=device, dtype=dtype)

    def step(name: str, precision: str) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast_for(precision)():
            loss = loss_of(models[name], batch)
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def cuda_peak(name: str, precision: str) -> int | None:
        if device != "cuda":
            return None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(name, precision)
        return torch.cuda.max_memory_allocated() - before

    times: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    for run in runs:  # warm-up
        step(*run)
    for _ in range(args.steps):
        for run in runs:
            times[run].append(step(*run))
    # the peak of each precision measured (float32 always: it is the reference); bf16 products are emulated,
    # and minutes slow, on CPUs without bf16 instructions
    peaks = {
        p: matmul_peak(PRECISIONS[p] or torch.float32, device, args.peak_size)
        for p in dict.fromkeys(("none", *precisions))
    }

    def operators(name: str, precision: str) -> int:
        with OperatorCount() as counter:
            step(name, precision)
        return counter.count

    # a dispatch mode cannot run compiled code: compiled steps are not counted
    counts = {run: None if args.compile else operators(*run) for run in runs}

    tokens = args.batch * args.length
    reference = statistics.median(times["peft", "none"])
    results = []
    for name, precision in runs:
        model = models[name]
        memory = saved_activation_bytes(model, batch, autocast_for(precision)) + trainable_state_bytes(model)
        if isinstance(model, loramix.MixLoraModel):
            active, rank = expert_parameters_per_token(model), next(iter(model.layers.values())).rank
        else:
            active, rank = sum(p.numel() for p in model.parameters() if p.requires_grad), args.rank
        median = statistics.median(times[name, precision])
        flops = step_flops(model, base, batch)
        results.append(
            {
                "variant": name,
                "precision": "float32" if precision == "none" else precision,
                "expert_rank": rank,
                "active_params": active,
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "samples": replication(model),
                "step_s": median,
                "steps_s": times[name, precision],
                "tokens_per_s": tokens / median,
                "time_vs_peft": median / reference,
                "memory_bytes": memory,
                "cuda_peak_bytes": cuda_peak(name, precision),
                "gflop_per_step": flops / 1e9,
                "gflop_per_s": flops / median / 1e9,
                "of_peak": flops / median / peaks[precision],
                "operators": counts[name, precision],
                "operators_vs_peft": None if args.compile else counts[name, precision] / counts["peft", "none"],
            }
        )
    peft_memory = results[0]["memory_bytes"]
    print(
        f"device={device} threads={torch.get_num_threads()} batch={args.batch}x{args.length} steps={args.steps} "
        f"{'compiled (inductor) ' if args.compile else ''}"
        "matmul peak: " + ", ".join(f"{PEAK_NAMES[p]} {peak / 1e9:.0f} GFLOP/s" for p, peak in peaks.items())
    )
    print(
        "| variant | precision | expert rank | active expert params/token | step s | tokens/s | time vs peft f32 "
        "| memory MB | vs peft | GFLOP/step | GFLOP/s | of matmul peak | operators/step | vs peft |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        cuda = f" (CUDA peak {r['cuda_peak_bytes'] / 2**20:,.0f})" if r["cuda_peak_bytes"] is not None else ""
        print(
            f"| {r['variant']} | {r['precision']} | {r['expert_rank']} | {r['active_params']:,} | {r['step_s']:.3f} | "
            f"{r['tokens_per_s']:,.0f} | {r['time_vs_peft']:.3f} | {r['memory_bytes'] / 2**20:,.0f}{cuda} | "
            f"{r['memory_bytes'] / peft_memory:.3f} | {r['gflop_per_step']:,.0f} | {r['gflop_per_s']:,.1f} | "
            f"{r['of_peak']:.0%} | {operators_cell(r)} |"
        )
    over = [
        r for r in results if r["variant"] in TOKEN_LEVEL and r["precision"] == "float32" and r["time_vs_peft"] > 1.15
    ]
    for r in over:
        per_sample = f", {r['time_vs_peft'] / r['samples']:.2f}x per routing sample" if r["samples"] > 1 else ""
        print(f"over the 1.15x goal in float32: {r['variant']} at {r['time_vs_peft']:.2f}x{per_sample}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"device": device, "threads": torch.get_num_threads(), "args": vars(args) | {"json": str(args.json)}}
        args.json.write_text(json.dumps(payload | {"matmul_peak_flops": peaks, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
