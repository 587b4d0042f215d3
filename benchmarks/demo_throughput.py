"""Training examples per second of a CPU recipe (ReMix by default), before and after each lever, side by side
in one process.

    python benchmarks/demo_throughput.py                    # configs/remix.yaml, 8 timed steps per variant
    python benchmarks/demo_throughput.py --steps 12 --rounds 2

Variants (each a fresh copy of the default model, trained on the recipe's tasks with its sampler and batch):
- before:     the prompts as they were, symptom2disease and medical_abstracts listing their labels;
- prompts:    today's prompts (the labels are scored, not listed);
- upper half: today's prompts, only the upper half of the decoder layers adapted (the backward stops there),
  the batch repeated once per ReMix routing sample at the input, as before;
- shared lower half: the same, the M routing samples sharing one forward through the frozen lower half
  (`MixLoraModel.first_adapted_block`; today's code).
Rounds interleave the variants so that machine noise hits them alike; each round times `--steps` steps after
one untimed step, with the same draws of tasks and examples for every variant. Printed: examples per second
(the median over rounds), tokens per example, and the ratio to `before`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from pathlib import Path

import torch

import loramix
from loramix.data import Example, get_task
from loramix.data.sampling import Encoder, TaskSampler
from loramix.models import load_model
from loramix.precision import use_bf16
from loramix.recipe import load_recipe
from loramix.train import answer_loss

ROOT = Path(__file__).resolve().parent.parent
LISTED = {  # the instructions of the tasks that listed their labels before choice scoring
    "medical_abstracts": "Which topic is this abstract about?",
    "symptom2disease": "Which diagnosis fits best?",
}


def with_listed_labels(example: Example) -> Example:
    """The example with its prompt as it was written before choice scoring (labels listed)."""
    if example.task not in LISTED:
        return example
    instruction = LISTED[example.task]
    prompt = example.prompt.replace(instruction, f"{instruction} Answer with one of: {', '.join(example.choices)}.")
    return dataclasses.replace(example, prompt=prompt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "remix.yaml")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    recipe = load_recipe(args.config)
    base, tokenizer = load_model(recipe.model)
    bf16 = use_bf16(recipe.training.bf16, torch.device("cpu"))
    train_sets = [get_task(name).load(recipe.data_dir)["train"] for name in recipe.tasks]
    layers = base.config.num_hidden_layers
    config = recipe.mixlora_config()
    every_layer = dataclasses.replace(config, layers_to_transform=None)
    upper_half = dataclasses.replace(config, layers_to_transform=list(range(layers // 2, layers)))
    variants = {  # name: (config, training sets, whether routing samples share the frozen lower blocks)
        "before": (every_layer, [[with_listed_labels(e) for e in s] for s in train_sets], False),
        "prompts": (every_layer, train_sets, False),
        "upper half": (upper_half, train_sets, False),
        "shared lower half": (upper_half, train_sets, True),
    }
    speeds: dict[str, list[float]] = {name: [] for name in variants}
    tokens: dict[str, float] = {}
    for round_index in range(args.rounds):
        for name, (variant_config, sets, share) in variants.items():
            torch.manual_seed(0)
            model = loramix.wrap(copy.deepcopy(base), variant_config).train()
            if not share:
                model.first_adapted_block = lambda: None  # repeat the batch at the input, as before
            encoder = Encoder(tokenizer, recipe.max_length, sets, recipe.system_prompt)
            sampler = TaskSampler(
                [len(s) for s in sets],
                recipe.sampling,
                recipe.sampling_temperature,
                seed=round_index,
                batching=recipe.batching,
            )
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.training.lr)
            real = 0
            for step in range(args.steps + 1):
                if step == 1:
                    started, real = time.perf_counter(), 0
                batch = encoder.batch(sampler.draw(recipe.training.batch_size))
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = answer_loss(model, batch)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                real += int(batch["attention_mask"].sum())
            seconds = time.perf_counter() - started
            speeds[name].append(args.steps * recipe.training.batch_size / seconds)
            tokens[name] = real / (args.steps * recipe.training.batch_size)
            print(f"round {round_index + 1} {name}: {speeds[name][-1]:.2f} examples/s", flush=True)
            del model, optimizer

    print(
        f"\n{recipe.name}: batch {recipe.training.batch_size}, max_length {recipe.max_length}, bf16 {bf16}, "
        f"{torch.get_num_threads()} threads, {args.steps} steps x {args.rounds} rounds\n"
    )
    print("| variant | examples/s | tokens/example | vs before |")
    print("|---|---:|---:|---:|")
    before = statistics.median(speeds["before"])
    for name, values in speeds.items():
        speed = statistics.median(values)
        print(f"| {name} | {speed:.2f} | {tokens[name]:.0f} | {speed / before:.2f}x |")


if __name__ == "__main__":
    main()
