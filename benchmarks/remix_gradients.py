"""What ReMix's router learns from: the size and the signal of its RLOO gradient, against the experts' gradient
and against a learned top-k router's, on real training batches.

    python benchmarks/remix_gradients.py                                   # fresh adapters, the demo's recipes
    python benchmarks/remix_gradients.py --run runs/long/remix-s0 --run runs/long/topk-s0   # trained ones
                                                   # (a run still training: its last checkpoint)
    python benchmarks/remix_gradients.py --run runs/samples/remix-s0 --samples 2,4,8   # ReMix's estimate at each M

For each router (`--routers`, recipes in configs/; or the adapter of each `--run`), on `--batches` training
batches drawn as training draws them (one task per batch), the script computes `--repeats` gradients of the
training loss (`compute_loss`: cross-entropy, the auxiliary losses and, for ReMix, the RLOO surrogate; each
repeat draws new routing samples) and reports:

- the gradient norm of the experts and of the routers, and the factor by which `training.max_grad_norm`
  clipping scales the whole step (1.0: not clipped). The routers' share of the clipped norm is what the
  experts lose;
- the router gradient's signal-to-noise ratio over the R repeats, ||E g||^2 / E||g - E g||^2: the squared norm
  of its expectation over the variance of one estimate, estimated without bias as (||mean||^2 - s^2 / R) / s^2
  with s^2 = sum ||g - mean||^2 / (R - 1). Infinite for a deterministic gradient (top-k's), near 0 when one
  step's estimate is mostly the noise of its routing samples;
- the mean cosine between two repeats' router gradients (1: the same direction).

`--samples M1,M2,...` measures a ReMix adapter at each number of routing samples M (one row per M, the same
batches): the RLOO estimate averages over M samples, so its variance should fall as 1/M and its SNR rise as M.

Only the weights' gradients are computed; nothing trains. Each repeat is one forward and backward of a batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from safetensors.torch import load_file

import loramix
from loramix.data import collate, encode_example, get_task
from loramix.models import load_model
from loramix.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
TASKS = "tasks=[medical_abstracts,symptom2disease,ncbi_disease]"


def training_batches(recipe, tokenizer, count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """`count` training batches of the recipe's batch size, one task per batch, tasks in turn."""
    generator = torch.Generator().manual_seed(seed)
    splits = [get_task(name).load(recipe.data_dir)["train"] for name in recipe.tasks]
    batches = []
    for index in range(count):
        task_id = index % len(recipe.tasks)
        train = splits[task_id]
        picks = torch.randint(len(train), (recipe.training.batch_size,), generator=generator).tolist()
        rows = [
            {
                **encode_example(train[i], tokenizer, recipe.max_length, system_prompt=recipe.system_prompt),
                "task_id": task_id,
            }
            for i in picks
        ]
        batches.append(collate(rows, tokenizer.pad_token_id))
    return batches


def gradient_groups(model: loramix.MixLoraModel) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(expert parameters, router parameters) that train."""
    routers = {id(p) for router in model.routers().values() for p in router.parameters()}
    trained = [p for p in model.parameters() if p.requires_grad]
    return [p for p in trained if id(p) not in routers], [p for p in trained if id(p) in routers]


def flat_gradient(parameters: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in parameters])


def measure(model: loramix.MixLoraModel, batches: list[dict], repeats: int, max_grad_norm: float) -> dict:
    """Gradient norms, clipping factor and the router gradient's signal over `repeats` per batch."""
    experts, routers = gradient_groups(model)
    model.train()
    rows = []
    for batch in batches:
        router_gradients, expert_norms = [], []
        for _ in range(repeats):
            model.zero_grad(set_to_none=True)
            model.compute_loss(batch).backward()
            router_gradients.append(flat_gradient(routers))
            expert_norms.append(float(flat_gradient(experts).norm()))
        stacked = torch.stack(router_gradients)
        mean = stacked.mean(0)
        variance = float((stacked - mean).square().sum() / max(repeats - 1, 1))
        signal = float(mean.square().sum())
        router_norms = stacked.norm(dim=1)
        cosines = [
            float(torch.nn.functional.cosine_similarity(stacked[i], stacked[j], dim=0))
            for i in range(repeats)
            for j in range(i + 1, repeats)
        ]
        totals = [(e**2 + float(r) ** 2) ** 0.5 for e, r in zip(expert_norms, router_norms, strict=True)]
        rows.append(
            {
                "expert_norm": statistics.mean(expert_norms),
                "router_norm": float(router_norms.mean()),
                "clip": statistics.mean(min(1.0, max_grad_norm / t) for t in totals),
                "snr": max(0.0, signal - variance / repeats) / variance if variance > 1e-12 * signal else float("inf"),
                "cosine": statistics.mean(cosines) if cosines else None,
            }
        )
    model.zero_grad(set_to_none=True)
    return {key: statistics.mean(row[key] for row in rows) for key in rows[0]}


def subject(name: str, overrides: list[str]) -> tuple[loramix.MixLoraModel, object, object, str]:
    """(model, tokenizer, recipe, label) for a router name (a fresh adapter from configs/NAME.yaml) or a run folder
    (its trained adapter)."""
    run = Path(name)
    if (run / "adapter").is_dir():
        recipe = load_recipe(run / "recipe.yaml")
        base, tokenizer = load_model(recipe.model)
        return loramix.load(base, run / "adapter"), tokenizer, recipe, f"{run.name} (trained)"
    if (run / "checkpoint" / "state.json").is_file():  # a run still training: its last checkpoint
        recipe = load_recipe(run / "recipe.yaml")
        base, tokenizer = load_model(recipe.model)
        model = loramix.wrap(base, recipe.adapter_config())
        state = load_file(run / "checkpoint" / "state.safetensors")
        unexpected = model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")}, strict=False)
        if unexpected.unexpected_keys:
            raise SystemExit(
                f"{run}: the checkpoint holds tensors this adapter lacks: {unexpected.unexpected_keys[:3]}"
            )
        step = json.loads((run / "checkpoint" / "state.json").read_text())["step"]
        return model, tokenizer, recipe, f"{run.name} at step {step}"
    recipe = load_recipe(ROOT / "configs" / f"{name}.yaml", overrides)
    torch.manual_seed(recipe.training.seed)
    base, tokenizer = load_model(recipe.model)
    return loramix.wrap(base, recipe.adapter_config()), tokenizer, recipe, f"{name} (fresh)"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routers", default="remix,topk", help="recipes in configs/ to start fresh adapters from")
    parser.add_argument("--run", action="append", default=[], help="a run folder whose adapter to measure instead")
    parser.add_argument("--set", action="append", default=[TASKS], metavar="KEY=VALUE", help="recipe overrides")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", default=None, help="ReMix: comma-separated M to measure (default: the recipe's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    names = args.run or args.routers.split(",")
    rows = []
    print("| adapter | expert grad norm | router grad norm | clip factor | router SNR (of R) | cosine of repeats |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        model, tokenizer, recipe, label = subject(name, args.set)
        batches = training_batches(recipe, tokenizer, args.batches, args.seed)
        config = model.mixlora_config
        counts = [int(m) for m in args.samples.split(",")] if args.samples and config.router == "remix" else [None]
        for samples in counts:
            if samples is not None:
                config.remix_samples = samples  # read by compute_loss at every step
            torch.manual_seed(args.seed)
            row = {
                "adapter": label,
                "samples": samples,
                **measure(model, batches, args.repeats, recipe.training.max_grad_norm),
            }
            rows.append(row)
            print(
                f"| {label}{'' if samples is None else f', M = {samples}'} | {row['expert_norm']:.3f} | "
                f"{row['router_norm']:.3f} | {row['clip']:.3f} | {row['snr']:.3g} ({args.repeats}) | "
                f"{row['cosine']:.3f} |",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
