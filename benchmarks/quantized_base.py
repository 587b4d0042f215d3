"""Memory of the default model's base in float32, bfloat16 and bitsandbytes 8- and 4-bit, and that the adapted
quantized model trains, side by side in one process.

    python benchmarks/quantized_base.py            # SmolLM2-135M-Instruct, `--steps` training steps of topk each

Printed per precision: the base model's memory (`get_memory_footprint`: parameters and buffers, the embedding and
output head included, which bitsandbytes leaves unquantized), the share of it in the linear layers loramix adapts,
and the first and last training loss of a loramix `topk` model (8 experts of rank 4, top-2) trained for a few
steps on one random batch, to show that the experts learn on every base.
"""

from __future__ import annotations

import argparse

import torch

import loramix
from loramix.models import DEFAULT_MODEL, load_model

PRECISIONS = {  # name: (dtype, quantization)
    "float32": (torch.float32, None),
    "bfloat16": (torch.bfloat16, None),
    "8-bit (bitsandbytes)": (torch.float32, "8bit"),
    "4-bit NF4 (bitsandbytes)": (torch.float32, "4bit"),
}


def linear_bytes(model: torch.nn.Module) -> int:
    """Bytes of the adapted layers' weights (every linear layer but the output head)."""
    head = model.get_output_embeddings()
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            total += module.weight.numel() * module.weight.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    ids = torch.randint(100, 40000, (2, 48), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :40] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    print("| base precision | base memory MB | vs float32 | adapted linears MB | topk loss: first -> last |")
    print("|---|---:|---:|---:|---|")
    reference = None
    for name, (dtype, quantization) in PRECISIONS.items():
        base, _ = load_model(args.model, dtype=dtype, quantization=quantization)
        memory = base.get_memory_footprint()
        reference = reference or memory
        linears = linear_bytes(base)
        config = loramix.MixLoraConfig("all-linear", router="topk", num_experts=8, expert_rank=4, top_k=2)
        model = loramix.wrap(base, config).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
        for _ in range(args.steps):
            with autocast:  # float32 experts on a bfloat16 base compute under autocast, as `bf16: auto` trains
                loss = model.compute_loss(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
        print(
            f"| {name} | {memory / 2**20:.0f} | {memory / reference:.2f}x | {linears / 2**20:.0f} | "
            f"{losses[0]:.3f} -> {losses[-1]:.3f} |",
            flush=True,
        )
        del model, base, optimizer


if __name__ == "__main__":
    main()
