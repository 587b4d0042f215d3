"""Operators per training step of loramix's routers against peft LoRA and against the fewest an eager PyTorch
mixture layer can dispatch: is issue 17's goal (<= 1.3x peft's operators in eager mode) reachable?

    python benchmarks/operators.py                       # a 30-layer tiny Llama: SmolLM2's decoder, narrow
    python benchmarks/operators.py --model SmolLM2-135M-Instruct

A step is forward, backward and the multi-tensor AdamW, counted by a dispatch mode (`train_step.OperatorCount`).
Operator counts do not depend on the widths of the layers, so a narrow Llama with SmolLM2's 30 decoder layers
counts what SmolLM2 does; every linear of every decoder layer is adapted (as in train_step.py), peft at rank 8,
the mixtures with 8 experts at the same activated rank.

The `minimal-*` variants are the floor: a hand-written layer per adapted linear with the router's own gate and
nothing else that loramix does (no routing records, statistics, masks or dropout). `minimal-soft`:
y = W0 x + B diag(softmax(G x)) A x; `minimal-topk` keeps the top 2 of the softmax (renormalised) and adds the
Switch balance loss over every layer at once (one stack, as loramix does). If even the floor dispatches more
than 1.3x peft's operators, no eager implementation with a router per adapted linear meets the goal.
"""

from __future__ import annotations

import argparse
import collections
import copy
import math

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn
from train_step import TARGETS, OperatorCount, build, loss_of

from loramix.models import load_model, tiny_llama
from loramix.targets import find_targets, replace_module

EXPERTS, TOP_K, PEFT_RANK = 8, 2, 8
LOOPED = ("soft", "topk", "prompt")  # loramix routers counted


class MinimalMixtureLinear(nn.Module):
    """y = W0 x + scale * B (w(x) * A x) with w the softmax of a gate (`top_k`: its k largest, renormalised);
    A: (n r, d_in) and B: (d_out, n r), stored in the layout the products use."""

    def __init__(self, base: nn.Linear, rank: int, top_k: int | None, probabilities: list[Tensor]) -> None:
        super().__init__()
        self.base, self.rank, self.top_k, self.probabilities = base, rank, top_k, probabilities
        self.gate = nn.Linear(base.in_features, EXPERTS, bias=False)
        self.lora_A = nn.Parameter(torch.randn(EXPERTS * rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, EXPERTS * rank))
        self.scale = 2.0 / rank

    def forward(self, x: Tensor) -> Tensor:
        logits = self.gate(x)
        if self.top_k is None:
            weights = logits.softmax(-1)
        else:
            top, indices = logits.topk(self.top_k, dim=-1)
            weights = torch.zeros_like(logits).scatter(-1, indices, top.softmax(-1))
            self.probabilities.append(logits.softmax(-1))
        hidden = F.linear(x, self.lora_A).unflatten(-1, (EXPERTS, self.rank)) * weights.unsqueeze(-1)
        return self.base(x) + self.scale * F.linear(hidden.flatten(-2), self.lora_B)


class MinimalMixture(nn.Module):
    """A frozen model whose target linears are MinimalMixtureLinear; the loss adds top-k's balance loss."""

    def __init__(self, model: nn.Module, rank: int, top_k: int | None) -> None:
        super().__init__()
        self.model, self.probabilities = model.requires_grad_(False), []
        for name in find_targets(model, TARGETS, None):
            layer = MinimalMixtureLinear(model.get_submodule(name), rank, top_k, self.probabilities)
            replace_module(model, name, layer)

    def loss(self, batch: dict) -> Tensor:
        self.probabilities.clear()
        loss = loss_of(self.model, batch)
        if self.probabilities:  # Switch: n * sum_i (share of top-1 picks of i) * (mean probability of i)
            probabilities = torch.stack(self.probabilities).flatten(1, -2)  # (modules, tokens, n)
            picks = F.one_hot(probabilities.argmax(-1), EXPERTS).float()
            loss = loss + 0.01 * EXPERTS * (picks.mean(1) * probabilities.mean(1)).sum(-1).mean()
        return loss


def build_variant(variant: str, base: nn.Module):
    """(model, loss function) of a variant on a fresh copy of `base`."""
    model = copy.deepcopy(base)
    if variant == "peft":
        config = LoraConfig(r=PEFT_RANK, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)
        peft_model = get_peft_model(model, config)
        return peft_model, lambda batch: loss_of(peft_model, batch)
    if variant.startswith("minimal-"):
        top_k = TOP_K if variant == "minimal-topk" else None
        minimal = MinimalMixture(model, PEFT_RANK // (top_k or EXPERTS), top_k)  # as many active ranks as peft
        return minimal, minimal.loss
    adapted = build(variant, model, PEFT_RANK)
    return adapted, lambda batch: loss_of(adapted, batch)


def step_operators(model: nn.Module, loss_fn, batch: dict) -> collections.Counter:
    """The operators of one training step (forward, backward, AdamW), after a warm-up step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], foreach=True)

    def step() -> None:
        loss_fn(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    step()
    with OperatorCount() as counter:
        step()
    return counter.by_name


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model name (default: a 30-layer tiny Llama)")
    parser.add_argument("--layers", type=int, default=30, help="decoder layers of the tiny Llama")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--variants", default=",".join(("minimal-soft", "minimal-topk", *LOOPED)))
    parser.add_argument("--top", type=int, default=12, help="operators listed per variant, by excess over peft")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base = load_model(args.model)[0] if args.model else tiny_llama(num_layers=args.layers)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, base.config.vocab_size, (args.batch, args.length), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}
    counts = {
        variant: step_operators(*build_variant(variant, base), batch) for variant in ["peft", *args.variants.split(",")]
    }
    peft = sum(counts["peft"].values())
    modules = len(find_targets(base, TARGETS, None))
    print(
        f"{args.model or f'tiny Llama, {args.layers} layers'}: {modules} adapted linears, batch {args.batch} x "
        f"{args.length}; operators per training step (forward, backward, AdamW)\n"
    )
    print("| variant | operators/step | vs peft | over peft per adapted linear |")
    print("|---|---:|---:|---:|")
    for variant, count in counts.items():
        total = sum(count.values())
        print(f"| {variant} | {total:,} | {total / peft:.2f}x | {(total - peft) / modules:.1f} |")
    for variant, count in counts.items():
        if variant != "peft":
            excess = count.copy()
            excess.subtract(counts["peft"])
            listed = ", ".join(f"{name} {n / modules:+.1f}" for name, n in excess.most_common(args.top) if n > 0)
            print(f"\n{variant}, the operators it adds per adapted linear: {listed}")
    return {variant: sum(count.values()) for variant, count in counts.items()}


if __name__ == "__main__":
    main()
