"""LoRAHub on an unseen task: compose per-task LoRAs for medqa_usmle from 5 examples, against zero-shot and averaging.

    python benchmarks/compose_unseen.py runs/task                      # a `task`-router run: one LoRA per task
    python benchmarks/compose_unseen.py runs/lora-pubmedqa runs/lora-mediqa_rqe ...   # single-task `lora` runs
    python benchmarks/compose_unseen.py runs/task --max-test 200 --seeds 0 1 2

Upstream: each `task`-router run gives one exported peft LoRA per trained task; each `lora` run trained on one
task gives its adapter. None of them may have seen the target task. A fixed draw (--examples-seed) of --shots
examples from the target's training split is the composition's data (--resample-examples: each seed draws its
own). Reported on the first --max-test test examples: zero-shot, the uniform average (w_i = 1/N on A and B,
LoRAHub's combination rule) and LoRAHub over the seeds (mean, sd, min-max; seed 0 searches from w = 0, the
others from their own random start), and per seed its gain over the uniform average and over zero-shot with a
95% paired-bootstrap interval (the same resampled test examples for both). Writes results.json, the tables and
each composed adapter (with its search curve) under --out.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from peft import PeftModel

from loramix.compose import Upstream, compose, load_upstream
from loramix.data import Example, get_task
from loramix.evaluate import compare, evaluate_model
from loramix.export import export_peft
from loramix.model import load
from loramix.models import load_model
from loramix.recipe import load_recipe


def upstream_from_runs(runs: list[Path], target: str, work_dir: Path) -> tuple[str | None, int, list[str], list[Path]]:
    """(base model, max_length, labels, adapter folders) of one LoRA per task of the runs."""
    recipes = [load_recipe(run / "recipe.yaml") for run in runs]
    models = {recipe.model for recipe in recipes}
    if len(models) != 1:
        raise ValueError(f"the runs use different base models {sorted(map(str, models))}")
    labels, paths = [], []
    for run, recipe in zip(runs, recipes, strict=True):
        if target in recipe.tasks:
            raise ValueError(f"{run} was trained on the target task {target!r}: it is not unseen")
        if recipe.lora is not None:
            if len(recipe.tasks) != 1:
                raise ValueError(
                    f"{run} trained one LoRA on {len(recipe.tasks)} tasks {recipe.tasks}; LoRAHub composes one LoRA "
                    f"per task: train the lora recipe once per task (tasks=[<task>]) or use a `task`-router run"
                )
            labels.append(f"{run.name}:{recipe.tasks[0]}")
            paths.append(run / "adapter")
            continue
        if recipe.mixlora_config().router != "task":
            raise ValueError(f"{run} uses router={recipe.mixlora_config().router!r}: only `task` runs export per task")
        model = load(load_model(recipe.model)[0], run / "adapter")
        for task_id, task in enumerate(recipe.tasks):
            labels.append(f"{run.name}:{task}")
            paths.append(export_peft(model, work_dir / "upstream" / f"{run.name}-{task}", task_id))
    return recipes[0].model, recipes[0].max_length, labels, paths


def draw_shots(train: list[Example], shots: int, seed: int) -> list[Example]:
    if len(train) < shots:
        raise ValueError(f"the target's training split has {len(train)} examples, fewer than --shots {shots}")
    return random.Random(seed).sample(train, shots)


def score(model, tokenizer, test: list[Example], max_length: int, adapter: Path | None = None) -> dict:
    """The target task's metrics and predictions of the base model, or of the base model with a peft adapter
    (then removed)."""
    scored = PeftModel.from_pretrained(model, adapter) if adapter is not None else model
    try:
        results = evaluate_model(scored, tokenizer, {test[0].task: test}, max_prompt_length=max_length)
    finally:
        if adapter is not None:
            scored.unload()
    return results[test[0].task]


def summary(runs: list[dict], metric: str) -> str:
    """One search's value, or, over searches that differ, mean ± sd (min-max)."""
    values = [run["metrics"][metric] for run in runs]
    if len({tuple(run["weights"].values()) for run in runs}) == 1:
        return f"{values[0]:.3f}" + (f" (the {len(runs)} seeds gave one search)" if len(runs) > 1 else "")
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def gain(difference: dict) -> str:
    return f"{difference['difference']:+.3f} [{difference['low']:+.3f}, {difference['high']:+.3f}]"


def markdown_table(results: dict) -> str:
    metrics = list(results["zero_shot"])
    rows = [
        "| method | " + " | ".join(metrics) + " |",
        "|---" * (len(metrics) + 1) + "|",
        "| zero-shot | " + " | ".join(f"{results['zero_shot'][m]:.3f}" for m in metrics) + " |",
        f"| uniform average (N={len(results['upstream'])}) | "
        + " | ".join(f"{results['uniform'][m]:.3f}" for m in metrics)
        + " |",
        f"| LoRAHub ({len(results['lorahub'])} seeds) | "
        + " | ".join(summary(results["lorahub"], m) for m in metrics)
        + " |",
        "",
        "| LoRAHub seed | weights | gain over the uniform average | gain over zero-shot |",
        "|---|---|---|---|",
    ]
    for run in results["lorahub"]:
        weights = ", ".join(f"{w:+.2f}" for w in run["weights"].values())
        differences = run["differences"]
        rows.append(
            f"| {run['seed']} | {weights} | {gain(differences['uniform'])} | {gain(differences['zero_shot'])} |"
        )
    metric = results["lorahub"][0]["differences"]["uniform"]["metric"]
    rows.append(f"\nGains: {metric}, with 95% paired-bootstrap intervals over the {results['n_test']} test examples.")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    model_name, recipe_length, labels, paths = upstream_from_runs(args.runs, args.target, args.out)
    max_length = args.max_length or recipe_length
    upstream: Upstream = load_upstream(paths)
    model, tokenizer = load_model(model_name)
    splits = get_task(args.target).load(args.data_dir)
    test = splits["test"][: args.max_test]

    results = {
        "target": args.target,
        "upstream": dict(zip(labels, map(str, paths), strict=True)),
        "settings": {k: v for k, v in vars(args).items() if k not in ("runs", "out", "data_dir")},
        "n_test": len(test),
        "max_length": max_length,
    }
    zero_shot = score(model, tokenizer, test, max_length)
    uniform = score(
        model, tokenizer, test, max_length, upstream.save(args.out / "uniform", [1 / len(upstream)] * len(upstream))
    )
    results["zero_shot"], results["uniform"], results["lorahub"] = zero_shot["metrics"], uniform["metrics"], []
    task = get_task(args.target)
    scores_by_weights: dict[tuple, dict] = {}  # equal weights (a repeated search), equal scores
    for seed in args.seeds:
        shots = draw_shots(splits["train"], args.shots, seed if args.resample_examples else args.examples_seed)
        result = compose(model, upstream, shots, args.budget, args.l1, seed, tokenizer=tokenizer, max_length=max_length)
        adapter = result.save(args.out / f"lorahub-seed{seed}")
        key = (tuple(result.weights), tuple(e.id for e in shots))
        if key not in scores_by_weights:
            scores_by_weights[key] = score(model, tokenizer, test, max_length, adapter)
        columns = {"lorahub": scores_by_weights[key], "uniform": uniform, "zero_shot": zero_shot}
        differences = compare(task, test, columns, against="lorahub")["differences"]
        entry = {"seed": seed, "weights": dict(zip(labels, result.weights, strict=True)), "loss": result.loss}
        metrics = scores_by_weights[key]["metrics"]
        results["lorahub"].append({**entry, "ce": result.ce, "metrics": metrics, "differences": differences})
        print(f"seed {seed}: loss {result.loss:.3f}, weights {[round(w, 3) for w in result.weights]}", file=sys.stderr)
    results["seconds"] = round(time.perf_counter() - started, 1)
    table = markdown_table(results)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "table.md").write_text(table + "\n")
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders: `task`-router runs or single-task lora runs")
    parser.add_argument("--target", default="medqa_usmle", help="the unseen task")
    parser.add_argument("--shots", type=int, default=5, help="examples of the target task the composition sees")
    parser.add_argument("--examples-seed", type=int, default=0, help="the draw of the examples")
    parser.add_argument("--resample-examples", action="store_true", help="each seed draws its own examples")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="LoRAHub search seeds")
    parser.add_argument("--budget", type=int, default=40, help="evaluations per search")
    parser.add_argument("--l1", type=float, default=0.05, help="weight of mean |w| in the objective")
    parser.add_argument("--max-test", type=int, default=None, help="score the first N test examples (default all)")
    parser.add_argument("--max-length", type=int, default=None, help="prompt tokens (default: the run's recipe)")
    parser.add_argument("--data-dir", type=Path, default=None, help="medical data folder")
    parser.add_argument("--out", type=Path, default=Path("runs/compose_unseen"), help="output folder")
    return parser.parse_args(argv)


if __name__ == "__main__":
    print(markdown_table(run(parse_args())))
