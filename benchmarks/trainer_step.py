"""Seconds per training step of a CPU recipe (ReMix by default) under transformers.Trainer (MixLoraTrainer)
against loramix's own loop, side by side in one process, on the same batches.

    python benchmarks/trainer_step.py                 # configs/remix.yaml, 10 timed steps each, 2 rounds
    python benchmarks/trainer_step.py --steps 20 --rounds 3

Both run the same step: the model's training loss (forward with labels = compute_loss), backward, gradient
clipping at the recipe's max_grad_norm, AdamW at a constant learning rate, bfloat16 autocast where the recipe's
`bf16: auto` picks it. The batches are drawn once (one task per batch, as the recipe) and each step of either
takes one of them; Trainer gets each batch as one item (batch size 1, a collator that pads its rows). The first
step of every run is not timed. Printed: the median seconds per step of each and their ratio.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments

import loramix
from loramix.data import collate, encode_example, get_task
from loramix.data.sampling import TaskSampler
from loramix.models import load_model
from loramix.precision import use_bf16
from loramix.recipe import load_recipe
from loramix.trainer import MixLoraTrainer

ROOT = Path(__file__).resolve().parent.parent


class StepClock(TrainerCallback):
    """The wall-clock time at the end of every Trainer step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def median_step(times: list[float]) -> float:
    return statistics.median(later - earlier for earlier, later in zip(times, times[1:], strict=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "remix.yaml")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    recipe = load_recipe(args.config)
    base, tokenizer = load_model(recipe.model)
    bf16 = use_bf16(recipe.training.bf16, torch.device("cpu"))
    train_sets = [get_task(name).load(recipe.data_dir)["train"] for name in recipe.tasks]
    sampler = TaskSampler([len(s) for s in train_sets], recipe.sampling, recipe.sampling_temperature, 0, "task")
    batches = [
        [
            {
                **encode_example(train_sets[task][index], tokenizer, recipe.max_length, True, recipe.system_prompt),
                "task_id": task,
            }
            for task, index in sampler.draw(recipe.training.batch_size)
        ]
        for _ in range(args.steps + 1)
    ]
    pad = tokenizer.pad_token_id
    settings, config = recipe.training, recipe.mixlora_config()
    seconds: dict[str, list[float]] = {"loramix loop": [], "MixLoraTrainer": []}
    for _ in range(args.rounds):
        torch.manual_seed(0)
        model = loramix.wrap(copy.deepcopy(base), config).train()
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
        times = []
        for rows in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(**collate(rows, pad)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter())
        seconds["loramix loop"].append(median_step(times))
        del model, optimizer

        torch.manual_seed(0)
        model = loramix.wrap(copy.deepcopy(base), config)
        clock = StepClock()
        with tempfile.TemporaryDirectory() as output:
            arguments = TrainingArguments(
                output_dir=output,
                per_device_train_batch_size=1,
                max_steps=len(batches),
                learning_rate=settings.lr,
                lr_scheduler_type="constant",
                weight_decay=settings.weight_decay,
                max_grad_norm=settings.max_grad_norm,
                bf16=bf16,
                use_cpu=True,
                save_strategy="no",
                logging_steps=10**6,
                report_to=[],
                disable_tqdm=True,
                dataloader_num_workers=0,
            )
            trainer = MixLoraTrainer(
                model=model,
                args=arguments,
                train_dataset=batches,
                data_collator=lambda items: collate(items[0], pad),
                callbacks=[clock],
            )
            trainer.train()
        seconds["MixLoraTrainer"].append(median_step(clock.times))
        del model, trainer

    print(
        f"\n{recipe.name}: batch {settings.batch_size}, bf16 {bf16}, {torch.get_num_threads()} threads, "
        f"{args.steps} timed steps x {args.rounds} rounds\n"
    )
    print("| loop | s/step (median over rounds) | vs loramix's loop |")
    print("|---|---:|---:|")
    own = statistics.median(seconds["loramix loop"])
    for name, values in seconds.items():
        print(f"| {name} | {statistics.median(values):.3f} | {statistics.median(values) / own:.2f}x |")


if __name__ == "__main__":
    main()
