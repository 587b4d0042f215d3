"""Decoding speed of loramix routers against the base model and peft LoRA, side by side in one process.

    python benchmarks/decode.py                        # batch 1, 64-token prompt, 32 new tokens, 5 rounds
    python benchmarks/decode.py --batch 8 --rounds 9
    python benchmarks/decode.py --variants base,base+static,prompt,prompt+static,task-merged,task-merged+static

Variants (all attention and MLP linears adapted; random adapters with non-zero B):
  base         the model alone
  peft         peft LoRA of rank 8, unmerged
  topk         loramix token-level routing: top-2 of 8 experts of rank 4, a router at every layer and token
  prompt       loramix MiLoRA: top-3 of the 7 modules (rank 8) of each decoder layer, routed once per prompt
  task-merged  loramix task router (8 experts of rank 1), the task's update merged (`merge_task`)
  task-rows    the same task adapter unmerged, with per-row gates, as the server runs mixed-tenant batches
A variant with `+static` decodes with a static key-value cache and a compiled forward (`static_decoding`:
CUDA graphs on a GPU, inductor kernels on a CPU); the warm-up pays its compilation.
Greedy decoding of a fixed number of new tokens. Every decoding step is timed (a stopping criterion notes the
time; the prompt's forward is left out) and the rounds interleave the variants so that noise on a shared
machine hits them alike. tokens/s = batch / median step time.
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import statistics
import time
from collections.abc import Callable

import torch
from peft import LoraConfig, get_peft_model
from transformers import StoppingCriteria, StoppingCriteriaList

import loramix
from loramix.compilation import static_decoding
from loramix.models import load_model
from loramix.serve import TaskRows

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIXTURES = {
    "topk": dict(router="topk", num_experts=8, expert_rank=4, top_k=2),
    "prompt": dict(router="prompt", expert_rank=8, top_k=3),
    "task-merged": dict(router="task", num_experts=8, expert_rank=1, num_tasks=8),
    "task-rows": dict(router="task", num_experts=8, expert_rank=1, num_tasks=8),
}
VARIANTS = ["base", "peft", *MIXTURES]
STATIC = "+static"
Generate = Callable[..., torch.Tensor]


class StepClock(StoppingCriteria):
    """Notes the time of every decoding step; never stops generation."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        if input_ids.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def steps(self) -> list[float]:
        """Durations of the decoding steps after the first token (which comes with the prompt's forward)."""
        return [later - earlier for earlier, later in itertools.pairwise(self.times)]


def randomise(model: loramix.MixLoraModel, seed: int = 0) -> None:
    """Give the experts a non-zero B (a fresh adapter's B is zero); speed does not depend on the values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.01)


def build(variant: str, base: torch.nn.Module, batch: int) -> Generate:
    """`generate` of a variant: a fresh copy of the base model with the variant's adapter."""
    name = variant.removesuffix(STATIC)
    model = copy.deepcopy(base)
    if name == "peft":
        config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
        model = get_peft_model(model, config).eval()
    elif name != "base":
        model = loramix.wrap(model, loramix.MixLoraConfig(TARGETS, **MIXTURES[name])).eval()
        randomise(model)
        if name == "task-merged":
            model = model.merge_task(0)
    options = static_decoding(model) if variant.endswith(STATIC) else {}
    if name != "task-rows":
        return functools.partial(model.generate, **options)
    rows, task_ids = TaskRows(model), torch.zeros(batch, dtype=torch.long)

    def generate(**kwargs) -> torch.Tensor:
        with rows.select(task_ids) as adapted:
            return adapted.generate(**kwargs, **options)

    return generate


def step_times(generate: Generate, inputs: dict, new_tokens: int) -> list[float]:
    clock = StepClock()
    with torch.inference_mode():
        generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([clock]),
        )
    return clock.steps()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name or path (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {VARIANTS}")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="timed generations per variant, interleaved")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if unknown := sorted({variant.removesuffix(STATIC) for variant in variants} - set(VARIANTS)):
        parser.error(f"unknown variants {unknown}; known: {VARIANTS}, each also with {STATIC}")
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    base, tokenizer = load_model(args.model, device=device)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(100, base.config.vocab_size, (args.batch, args.prompt_length), generator=generator)
    inputs = {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pad_token_id": tokenizer.pad_token_id,
    }
    models = {variant: build(variant, base, args.batch) for variant in variants}
    for generate in models.values():  # warm-up
        step_times(generate, inputs, 4)
    steps: dict[str, list[float]] = {variant: [] for variant in variants}
    for round_ in range(args.rounds):
        for variant in variants[round_ % len(variants) :] + variants[: round_ % len(variants)]:
            steps[variant] += step_times(models[variant], inputs, args.new_tokens)

    rate = {variant: args.batch / statistics.median(times) for variant, times in steps.items()}
    print(
        f"model {args.model or 'SmolLM2-135M-Instruct'} on {device} ({torch.get_num_threads()} threads), "
        f"batch {args.batch}, prompt {args.prompt_length} tokens, {args.new_tokens} new tokens, "
        f"{args.rounds} rounds: tokens/s = batch / median decoding step\n"
    )
    print("| variant | decode tokens/s | ms per step | vs base | static vs eager |")
    print("|---|---:|---:|---:|---:|")
    for variant in variants:
        versus = f"{rate[variant] / rate['base']:.2f}x" if "base" in rate else "-"
        eager = variant.removesuffix(STATIC)
        speedup = f"{rate[variant] / rate[eager]:.2f}x" if variant != eager and eager in rate else "-"
        print(f"| {variant} | {rate[variant]:.1f} | {1000 * args.batch / rate[variant]:.1f} | {versus} | {speedup} |")
    goals = [("prompt", "topk", 1.2), ("task-merged", "base", 0.97)]
    rows = [(a, b, target) for a, b, target in goals if a in rate and b in rate]
    if rows:
        print("\n| goal | measured | met |\n|---|---:|---|")
        for a, b, target in rows:
            ratio = rate[a] / rate[b]
            print(f"| {a} >= {target}x {b} | {ratio:.2f}x | {'yes' if ratio >= target else 'no'} |")


if __name__ == "__main__":
    main()
