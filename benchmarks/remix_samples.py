"""ReMix's routing samples M: one forward/backward over the M-times-repeated batch (what `compute_loss` does)
against M separate forward passes over the batch, each with its own routing sample, for M = 2, 4, 8.

    python benchmarks/remix_samples.py                       # SmolLM2-135M, the remix recipe's adapter
    python benchmarks/remix_samples.py --samples 2,4,8 --steps 3 --json runs/bench/remix_samples.json

Both ways compute the same loss (mean cross-entropy + the RLOO surrogate) from the same routing samples
(the Gumbel noise of every routing draw is fixed per sample), so they give the same gradients; the
benchmark checks this before timing. The separate way keeps the M graphs alive until one backward call
(the RLOO advantage of a sample needs the losses of all M), so it does M B-row forwards and M B-row
backwards where the replicated way does one M B-row forward and backward. Timed: forward + backward
(the optimizer step is the same in both and left out), interleaved, median of `--steps`.
Goals: t(M = 8) <= 4 t(M = 2), and the replicated batch never slower than the separate passes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

import loramix
import loramix.routing.remix as remix_routing
from loramix.losses import rloo_surrogate
from loramix.models import load_model
from loramix.recipe import load_recipe

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "remix.yaml"


class FixedRoutes:
    """Replaces ReMix's Gumbel-top-k draw by one whose noise is fixed per (M, routing call, sample), so that a
    replicated forward (M B rows) and M separate forwards (B rows each) draw the same experts."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.noise: dict[tuple[int, int], torch.Tensor] = {}
        self.samples, self.sample, self.call = 2, None, 0

    def start(self, samples: int, sample: int | None = None) -> None:
        """Call before each forward: `sample` is None for a replicated forward, else the sample it stands for."""
        self.samples, self.sample, self.call = samples, sample, 0

    def draw(self, log_probs: torch.Tensor, k: int) -> torch.Tensor:
        rows = log_probs.shape[0] if self.sample is not None else log_probs.shape[0] // self.samples
        key = (self.samples, self.call)
        if key not in self.noise:
            generator = torch.Generator().manual_seed(self.seed + self.call)
            uniform = torch.rand((self.samples, rows, *log_probs.shape[1:]), generator=generator).clamp_(1e-20, 1.0)
            self.noise[key] = -(-uniform.log()).log()
        self.call += 1
        noise = self.noise[key].to(log_probs.device)
        noise = noise.flatten(0, 1) if self.sample is None else noise[self.sample]
        return (log_probs + noise).topk(k, dim=-1).indices

    @contextmanager
    def installed(self):
        original = remix_routing.sample_without_replacement
        remix_routing.sample_without_replacement = self.draw
        try:
            yield self
        finally:
            remix_routing.sample_without_replacement = original


def make_batch(vocab_size: int, batch: int, length: int, answer: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids; only the last `answer` tokens of each row carry labels (like the medical answers)."""
    input_ids = torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    labels = input_ids.clone()
    labels[:, : length - answer] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def replicated_loss(model: loramix.MixLoraModel, batch: dict, samples: int, routes: FixedRoutes) -> torch.Tensor:
    """`compute_loss`: one forward over the batch repeated `samples` times."""
    model.mixlora_config.remix_samples = samples
    routes.start(samples)
    return model.compute_loss(batch)


def separate_loss(model: loramix.MixLoraModel, batch: dict, samples: int, routes: FixedRoutes) -> torch.Tensor:
    """The same loss from `samples` forwards over the batch: mean cross-entropy + the RLOO surrogate."""
    labels, attention_mask = batch["labels"], batch["attention_mask"]
    predicts_label = F.pad(labels[:, 1:] != -100, (0, 1), value=False)
    targets = labels[:, 1:][predicts_label[:, :-1]]
    rows = predicts_label.nonzero()[:, 0]
    counts = torch.zeros(len(labels), device=labels.device).index_add_(0, rows, torch.ones(len(rows)))
    means, sequence_losses, log_probs = [], [], []
    for sample in range(samples):
        routes.start(samples, sample)
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=attention_mask,
            prompt_mask=attention_mask.bool() & (labels == -100),
            logits_to_keep=predicts_label,
        ).logits
        token_losses = F.cross_entropy(logits.float(), targets, reduction="none")
        means.append(token_losses.mean())
        sequence_losses.append(torch.zeros_like(counts).index_add(0, rows, token_losses) / counts.clamp_min(1))
        records = [r for r in model.context.records if r.routing.log_prob is not None]
        log_probs.append(sum((r.routing.log_prob * r.mask).sum(1) for r in records))
    return torch.stack(means).mean() + rloo_surrogate(torch.stack(sequence_losses), torch.stack(log_probs))


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest |a - b| / max|a| over the parameters (0 for identical gradients)."""
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max() / a[n].abs().max().clamp_min(1e-30)) for n in a)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name or path (default: the remix recipe's)")
    parser.add_argument("--samples", default="2,4,8", help="comma-separated values of M")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--answer", type=int, default=8, help="labelled tokens at the end of each row")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per (M, way) after one warm-up")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    samples = [int(m) for m in args.samples.split(",")]
    if min(samples) < 2:
        parser.error("RLOO needs M >= 2 samples")

    recipe = load_recipe(RECIPE)
    base, _ = load_model(args.model or recipe.model)
    config = recipe.mixlora_config()
    if args.model and args.model != recipe.model:  # the recipe's layers are the default model's
        config = dataclasses.replace(config, layers_to_transform=None)
    model = loramix.wrap(base, config).train()
    with torch.no_grad():  # B = 0 at the start would hide the expert gradients' paths through later layers
        for layer in model.layers.values():
            layer.lora_B.normal_(std=0.01)
    batch = make_batch(base.config.vocab_size, args.batch, args.length, args.answer)
    ways = {"replicated": replicated_loss, "separate": separate_loss}
    runs = [(m, way) for m in samples for way in ways]
    routes = FixedRoutes()

    def step(m: int, way: str) -> float:
        start = time.perf_counter()
        ways[way](model, batch, m, routes).backward()
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        return elapsed

    agreement = {}
    with routes.installed():
        for m in samples:  # warm-up, and the check that both ways compute the same gradients
            replicated_loss(model, batch, m, routes).backward()
            expected = gradients(model)
            separate_loss(model, batch, m, routes).backward()
            agreement[m] = max_relative_difference(expected, gradients(model))
        times: dict[tuple[int, str], list[float]] = {run: [] for run in runs}
        for _ in range(args.steps):
            for run in runs:
                times[run].append(step(*run))

    smallest = min(samples)
    reference = statistics.median(times[smallest, "replicated"])
    results = []
    print(
        f"threads={torch.get_num_threads()} batch={args.batch}x{args.length} (answer {args.answer} tokens) "
        f"steps={args.steps}; forward+backward seconds, median"
    )
    print(
        f"| M | replicated s | separate s | replicated / separate | vs M={smallest} | M / {smallest} | max grad diff |"
    )
    print("|---|---|---|---|---|---|---|")
    for m in samples:
        replicated, separate = (statistics.median(times[m, way]) for way in ways)
        results.append(
            {
                "samples": m,
                "replicated_s": replicated,
                "separate_s": separate,
                "replicated_steps_s": times[m, "replicated"],
                "separate_steps_s": times[m, "separate"],
                "replicated_vs_separate": replicated / separate,
                "vs_smallest": replicated / reference,
                "max_relative_grad_difference": agreement[m],
            }
        )
        print(
            f"| {m} | {replicated:.3f} | {separate:.3f} | {replicated / separate:.2f} | {replicated / reference:.2f}x "
            f"| {m / smallest:.0f}x | {agreement[m]:.1e} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"threads": torch.get_num_threads(), "args": vars(args) | {"json": str(args.json)}}
        args.json.write_text(json.dumps(payload | {"results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
