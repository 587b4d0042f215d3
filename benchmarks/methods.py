"""Decoding speed of PEDRO, IAPT, AdaLink and ALoRA against peft LoRA of equal trainable parameters, side by
side in one process: at batch 1, and for 8 tenants in mixed batches of 8.

    python benchmarks/methods.py                      # 64-token prompt, 32 new tokens, 5 rounds; 16 requests
    python benchmarks/methods.py --rounds 9 --variants base,peft,pedro

Every variant is its shipped recipe's adapter (configs/<name>.yaml; peft from configs/lora.yaml: rank 8 on the
7 linears of the upper 15 decoder layers), with random non-zero weights; sizes are printed.
  base       the model alone (the ceiling)
  peft       one peft LoRA at batch 1; 8 peft LoRAs, `generate(adapter_names=...)`, for 8 tenants
  pedro      PEDRO: vectors generated once per prompt rescale q, v and up at every step
  iapt       IAPT: 4 soft tokens per layer generated once per prompt, attended to at every step
  adalink    AdaLink: a per-tenant low-rank adapter on the input embeddings only
  alora      ALoRA: gated LoRA ranks (its allocation at initialisation); one adapter for every tenant
PEDRO and IAPT serve every tenant with one adapter (each row's vectors or soft tokens come from its own
prompt), AdaLink with one embedding adapter per tenant. Rounds interleave the variants. Batch 1: decode tokens/s
= 1 / median decoding step (the prompt's forward left out). Tenants: tokens/s = generated tokens / wall time,
prompt forwards included (median over rounds).
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch
from decode import step_times
from peft import LoraConfig, get_peft_model
from tenants import TENANTS, batches, run

import loramix
from loramix.models import load_model
from loramix.recipe import load_recipe

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VARIANTS = ["base", "peft", "pedro", "iapt", "adalink", "alora"]


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the adapter's zero-initialised tensors small random values (speed does not depend on them)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator).to(parameter) * 0.01)
    return model


def build(variant: str, base: torch.nn.Module, tenants: int):
    """(generate(inputs, tenant of each row, **kwargs), trainable parameters) of a variant, on a fresh copy."""
    model = copy.deepcopy(base)
    if variant == "base":
        return (lambda inputs, rows, **kwargs: model.generate(**inputs, **kwargs)), 0
    if variant == "peft":
        lora = load_recipe(CONFIGS / "lora.yaml").lora
        config = LoraConfig(**lora, init_lora_weights=False)
        peft_model = get_peft_model(model, config, adapter_name="tenant0")
        for tenant in range(1, tenants):
            peft_model.add_adapter(f"tenant{tenant}", config)
        peft_model.eval()
        size = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n and ".tenant0." in n)
        if tenants == 1:
            return (lambda inputs, rows, **kwargs: peft_model.generate(**inputs, **kwargs)), size

        def generate(inputs: dict, rows: list[int], **kwargs) -> torch.Tensor:
            return peft_model.generate(**inputs, adapter_names=[f"tenant{t}" for t in rows], **kwargs)

        return generate, size
    recipe = load_recipe(CONFIGS / f"{variant}.yaml")
    config = recipe.adapter_config()
    if hasattr(config, "num_tasks") and config.num_tasks is not None:
        config.num_tasks = max(tenants, config.num_tasks)
    adapted = randomised(loramix.wrap(model, config)).eval()
    size = adapted.count_parameters()["active_per_token"]

    def generate(inputs: dict, rows: list[int], **kwargs) -> torch.Tensor:
        task_ids = torch.tensor(rows, device=inputs["input_ids"].device)
        return adapted.generate(**inputs, task_ids=task_ids, **kwargs)

    return generate, size


def one_tenant(generate):
    """generate(**inputs) of a variant's generate(inputs, tenants) for a batch of tenant 0."""
    return lambda **inputs: generate(inputs, [0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name or path (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {VARIANTS}")
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=16, help="tenant requests (tenant = request % 8)")
    parser.add_argument("--batch", type=int, default=8, help="batch size of the tenant requests")
    parser.add_argument("--rounds", type=int, default=5, help="timed runs per variant, interleaved")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if unknown := sorted(set(variants) - set(VARIANTS)):
        parser.error(f"unknown variants {unknown}; known: {VARIANTS}")
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base, tokenizer = load_model(args.model, device=device)

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(100, base.config.vocab_size, (1, args.prompt_length), generator=generator).to(device)
    single = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pad_token_id": tokenizer.pad_token_id,
    }
    work = batches(args, base.config.vocab_size, tokenizer.pad_token_id, device)
    alone = {variant: build(variant, base, 1) for variant in variants}
    mixed = {variant: build(variant, base, TENANTS) for variant in variants}
    for variant in variants:  # warm-up
        step_times(one_tenant(alone[variant][0]), single, 4)
        run(mixed[variant][0], work[:1], 2)

    steps = {variant: [] for variant in variants}
    seconds = {variant: [] for variant in variants}
    for round_ in range(args.rounds):
        for variant in variants[round_ % len(variants) :] + variants[: round_ % len(variants)]:
            steps[variant] += step_times(one_tenant(alone[variant][0]), single, args.new_tokens)
            seconds[variant].append(run(mixed[variant][0], work, args.new_tokens)[0])

    decode = {variant: 1 / statistics.median(times) for variant, times in steps.items()}
    throughput = {variant: args.requests * args.new_tokens / statistics.median(t) for variant, t in seconds.items()}
    print(
        f"model {args.model or 'SmolLM2-135M-Instruct'} on {device} ({torch.get_num_threads()} threads): batch 1 "
        f"with a {args.prompt_length}-token prompt; {TENANTS} tenants, {args.requests} requests in mixed batches of "
        f"{args.batch}, prompts of 16-64 tokens; {args.new_tokens} new tokens; {args.rounds} rounds\n"
    )
    print("| variant | adapter parameters | batch 1 decode tokens/s | vs peft | 8 tenants tokens/s | vs peft |")
    print("|---|---:|---:|---:|---:|---:|")
    for variant in variants:
        versus = [
            f"{rates[variant] / rates['peft']:.2f}x" if "peft" in rates else "-" for rates in (decode, throughput)
        ]
        print(
            f"| {variant} | {alone[variant][1]:,} | {decode[variant]:.1f} | {versus[0]} | "
            f"{throughput[variant]:.1f} | {versus[1]} |"
        )
    claims = [(name, "peft") for name in ("pedro", "iapt") if name in decode and "peft" in decode]
    for name, peer in claims:
        verdict = (
            "supported" if decode[name] > decode[peer] and throughput[name] > throughput[peer] else "not supported"
        )
        print(f"\nclaim: {name} decodes faster than LoRA, alone and with 8 tenants: {verdict}")


if __name__ == "__main__":
    main()
