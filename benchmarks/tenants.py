"""Throughput of 8 tenants in mixed batches: loramix's task router against peft's mixed-adapter batches.

    python benchmarks/tenants.py                       # 16 requests in batches of 8, 32 new tokens, 3 rounds
    python benchmarks/tenants.py --batch 16 --requests 32

The same requests for every variant: prompts of 16 to 64 random tokens, request i from tenant i % 8, so every
batch mixes the tenants; greedy decoding of a fixed number of new tokens.
  loramix       task router, 8 experts of rank 2 (a rank-16 update per tenant); a mixed batch runs in one
                forward with per-row task gates (`loramix.serve.TaskRows`, what the server runs)
  loramix-core  the same adapter through `MixLoraModel.generate(task_ids=...)` (the core's dense dispatch)
  peft          8 peft LoRA adapters of rank 16, `generate(adapter_names=[...])`: peft runs each layer's LoRA once
                per adapter present in the batch
  base          the model without adapters: the ceiling for any adapter
Rounds interleave the variants. tokens/s: generated tokens / wall time, prompt forwards included (median over
rounds); decode tokens/s: batch / median decoding step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from decode import TARGETS, StepClock, randomise
from peft import LoraConfig, get_peft_model
from transformers import StoppingCriteriaList

import loramix
from loramix.models import load_model
from loramix.serve import TaskRows

TENANTS = 8
VARIANTS = ["base", "peft", "loramix-core", "loramix"]


def build(variant: str, base: torch.nn.Module, rank: int):
    """generate(batch inputs, tenant ids, **kwargs) of a variant: a fresh copy of the model with its adapters."""
    model = copy.deepcopy(base)
    if variant == "base":
        return lambda inputs, tenants, **kwargs: model.generate(**inputs, **kwargs)
    if variant == "peft":
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
        peft_model = get_peft_model(model, config, adapter_name="tenant0")
        for tenant in range(1, TENANTS):
            peft_model.add_adapter(f"tenant{tenant}", config)
        peft_model.eval()

        def generate(inputs: dict, tenants: list[int], **kwargs) -> torch.Tensor:
            return peft_model.generate(**inputs, adapter_names=[f"tenant{t}" for t in tenants], **kwargs)

        return generate
    experts = 8
    config = loramix.MixLoraConfig(
        TARGETS, router="task", num_experts=experts, expert_rank=rank // experts, alpha=2 * rank, num_tasks=TENANTS
    )
    mix = loramix.wrap(model, config).eval()
    randomise(mix)
    if variant == "loramix-core":
        return lambda inputs, tenants, **kwargs: mix.generate(
            **inputs, task_ids=torch.tensor(tenants, device=inputs["input_ids"].device), **kwargs
        )
    rows = TaskRows(mix)

    def generate(inputs: dict, tenants: list[int], **kwargs) -> torch.Tensor:
        with rows.select(torch.tensor(tenants)) as adapted:
            return adapted.generate(**inputs, **kwargs)

    return generate


def batches(args, vocab_size: int, pad_token_id: int, device: str) -> list[tuple[dict, list[int]]]:
    """The requests as left-padded batches on `device`: (inputs, tenant of each row)."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 65, (args.requests,), generator=generator).tolist()
    prompts = [torch.randint(100, vocab_size, (n,), generator=generator) for n in lengths]
    result = []
    for start in range(0, args.requests, args.batch):
        chunk = prompts[start : start + args.batch]
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), pad_token_id)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(chunk):
            input_ids[row, width - len(prompt) :] = prompt
            attention_mask[row, width - len(prompt) :] = 1
        inputs = {
            "input_ids": input_ids.to(device),
            "attention_mask": attention_mask.to(device),
            "pad_token_id": pad_token_id,
        }
        result.append((inputs, [i % TENANTS for i in range(start, start + len(chunk))]))
    return result


def run(generate, work: list, new_tokens: int) -> tuple[float, list[float], list[torch.Tensor]]:
    """(seconds, decoding step times, outputs) of generating for every batch."""
    clock, outputs = StepClock(), []
    started = time.perf_counter()
    with torch.inference_mode():
        for inputs, tenants in work:
            clock.times.clear()
            output = generate(
                inputs,
                tenants,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                stopping_criteria=StoppingCriteriaList([clock]),
            )
            outputs.append(output)
    return time.perf_counter() - started, clock.steps(), outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name or path (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16, help="rank of each tenant's update (a multiple of 8)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    if args.rank % 8:
        parser.error("--rank must be a multiple of 8 (8 experts share it)")
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    base, tokenizer = load_model(args.model, device=device)
    work = batches(args, base.config.vocab_size, tokenizer.pad_token_id, device)
    models = {variant: build(variant, base, args.rank) for variant in VARIANTS}
    for generate in models.values():  # warm-up
        run(generate, work[:1], 2)
    seconds: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    steps: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    outputs = {}
    for round_ in range(args.rounds):
        for variant in VARIANTS[round_ % len(VARIANTS) :] + VARIANTS[: round_ % len(VARIANTS)]:
            elapsed, step_times, outputs[variant] = run(models[variant], work, args.new_tokens)
            seconds[variant].append(elapsed)
            steps[variant] += step_times

    generated = args.requests * args.new_tokens
    throughput = {variant: generated / statistics.median(times) for variant, times in seconds.items()}
    decode = {variant: args.batch / statistics.median(times) for variant, times in steps.items()}
    same = sum(torch.equal(a, b) for a, b in zip(outputs["loramix"], outputs["loramix-core"], strict=True))
    print(
        f"model {args.model or 'SmolLM2-135M-Instruct'} on {device} ({torch.get_num_threads()} threads): "
        f"{TENANTS} tenants, {args.requests} requests in mixed batches of {args.batch}, prompts of 16-64 tokens, "
        f"{args.new_tokens} new tokens, rank {args.rank} per tenant, {args.rounds} rounds\n"
    )
    print("| variant | tokens/s | decode tokens/s | loramix is faster by |")
    print("|---|---:|---:|---:|")
    for variant in VARIANTS:
        print(
            f"| {variant} | {throughput[variant]:.1f} | {decode[variant]:.1f} | "
            f"{throughput['loramix'] / throughput[variant]:.2f}x |"
        )
    ratio = throughput["loramix"] / throughput["peft"]
    print(f"\ngoal loramix >= 2x peft: {ratio:.2f}x ({'met' if ratio >= 2 else 'not met'})")
    print(f"loramix batches with the same tokens as loramix-core: {same}/{len(work)}")


if __name__ == "__main__":
    main()
