"""lm-evaluation-harness's `--model loramix` against its own `--model hf` on one local multiple-choice task, side
by side in one process.

    python benchmarks/harness_speed.py                       # 200 MedQA questions, the letters as choices
    python benchmarks/harness_speed.py --choices texts       # the options' texts as choices (several tokens)

The task is a harness YAML task written here from the medical data folder (no download): the first --questions
questions of MedQA-USMLE's test file as "Question: ... A. ... D. ...\\nAnswer:", scored by the log-likelihood of
each choice after it (`acc`). Models, on the recipes' base model in float32:
- hf:      the harness's HFLM on the base model;
- mixture: `LoramixLM` on a run of --mixture (default configs/topk.yaml: top-2 of 8 experts per token);
- merged:  `LoramixLM` with merge=true on a run of --task-recipe (configs/task.yaml), its first task merged.
The runs' adapters are random (B ~ N(0, 0.02)): their compute is measured, not what they learnt. Rounds
interleave the models so that machine noise hits them alike. Each evaluation is the model's `loglikelihood` of
every request the harness builds for the task (tokenisation included; building the task, the same for every
model, is not). Printed: seconds per evaluation (the median over rounds), accuracy and the ratio to hf.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager, get_task_dict

import loramix
from loramix.data.paths import resolve_data_dir
from loramix.harness import LoramixLM
from loramix.models import load_model
from loramix.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
TASK = "harness_speed_medqa"
LETTERS = ("A", "B", "C", "D")


def write_task(folder: Path, data_dir: Path | None, questions: int, choices: str) -> Path:
    """The MedQA harness task (docs.jsonl and its YAML) in `folder`."""
    lines = (resolve_data_dir(data_dir) / "medqa_usmle" / "test.jsonl").read_text().splitlines()[:questions]
    docs = []
    for line in lines:
        item = json.loads(line)
        options = "\n".join(f"{letter}. {item['options'][letter]}" for letter in LETTERS)
        texts = [item["options"][letter] for letter in LETTERS]
        docs.append(
            {
                "text": f"Question: {item['question']}\n{options}\nAnswer:",
                "choices": list(LETTERS) if choices == "letters" else texts,
                "gold": LETTERS.index(item["answer_idx"]),
            }
        )
    (folder / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    task = {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(folder / "docs.jsonl")}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{text}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "metric_list": [{"metric": "acc", "higher_is_better": True}],
    }
    (folder / f"{TASK}.yaml").write_text(json.dumps(task, indent=2))  # JSON is YAML
    return folder


def write_run(run: Path, recipe_path: Path, overrides: list[str], seed: int = 0) -> Path:
    """A run folder: the recipe and its adapter on the recipe's base model, B drawn at random."""
    recipe = load_recipe(recipe_path, overrides)
    model = loramix.wrap(load_model(recipe.model)[0], recipe.adapter_config())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.02)
    run.mkdir(parents=True)
    recipe.to_yaml(run / "recipe.yaml")
    model.save_pretrained(run / "adapter")
    return run


def task_requests(task_folder: Path) -> list:
    """The task's log-likelihood requests, as `simple_evaluate` builds them."""
    task = get_task_dict([TASK], TaskManager(include_path=str(task_folder)))[TASK]
    task.build_all_requests(rank=0, world_size=1)
    return task.instances


def timed(lm, requests: list) -> tuple[float, float]:
    """(seconds, accuracy) of the model scoring every request (tokenisation included)."""
    started = time.perf_counter()
    scores = lm.loglikelihood(requests, disable_tqdm=True)
    seconds = time.perf_counter() - started
    best: dict[int, tuple[float, int]] = {}
    for request, (total, _) in zip(requests, scores, strict=True):
        best[request.doc_id] = max(best.get(request.doc_id, (-math.inf, -1)), (total, request.idx))
    golds = {request.doc_id: request.doc["gold"] for request in requests}
    return seconds, sum(best[doc][1] == gold for doc, gold in golds.items()) / len(golds)


def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="harness_speed-"))
    try:
        requests = task_requests(write_task(work, args.data_dir, args.questions, args.choices))
        mixture = write_run(work / "mixture", args.mixture, args.set)
        task_run = write_run(work / "task", args.task_recipe, args.set)
        base, tokenizer = load_model(load_recipe(mixture / "recipe.yaml").model)
        options = {"batch_size": args.batch_size}
        models = {
            "hf": HFLM(pretrained=base, tokenizer=tokenizer, **options),
            "mixture": LoramixLM(run=str(mixture), bf16=False, **options),
            "merged": LoramixLM(
                run=str(task_run),
                task=load_recipe(task_run / "recipe.yaml").tasks[0],
                merge=True,
                bf16=False,
                **options,
            ),
        }
        seconds: dict[str, list[float]] = {name: [] for name in models}
        accuracy = {}
        for number in range(args.rounds):
            for name, lm in models.items():
                elapsed, accuracy[name] = timed(lm, requests)
                seconds[name].append(elapsed)
                print(f"round {number}: {name} {elapsed:.1f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "seconds": seconds,
        "median_seconds": medians,
        "accuracy": accuracy,
        "ratio_to_hf": {name: medians[name] / medians["hf"] for name in models},
    }


def table(results: dict) -> str:
    rows = ["| model | seconds (median) | acc | ratio to hf |", "|---|---|---|---|"]
    for name, value in results["median_seconds"].items():
        rows.append(f"| {name} | {value:.1f} | {results['accuracy'][name]:.3f} | {results['ratio_to_hf'][name]:.2f}x |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=200, help="the first N questions of MedQA's test file")
    parser.add_argument("--choices", choices=("letters", "texts"), default="letters", help="what each choice is")
    parser.add_argument("--batch-size", type=int, default=8, help="every model's batch_size")
    parser.add_argument("--rounds", type=int, default=1, help="evaluations per model, interleaved")
    parser.add_argument("--mixture", type=Path, default=ROOT / "configs" / "topk.yaml", help="the mixture's recipe")
    parser.add_argument("--task-recipe", type=Path, default=ROOT / "configs" / "task.yaml", help="merged task's")
    parser.add_argument("--set", action="append", default=[], help="recipe override key=value (both recipes)")
    parser.add_argument("--data-dir", type=Path, default=None, help="medical data folder")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    measured = run(arguments)
    if arguments.out:
        arguments.out.write_text(json.dumps(measured, indent=2))
    print(table(measured))
