"""Every recipe against peft LoRA on the five trainable medical tasks: scores over seeds, training cost, the
routing imbalance (ESS over training) of learned routers against ReMix, and ReMix's sample count M.

    make bench-accuracy                   # every variant, seeds 0 and 1, the demo recipes' budget (hours on a CPU)
    python benchmarks/accuracy.py --recipes lora,remix --seeds 0 --steps 10 --eval-examples 10 \\
        --out runs/accuracy-short         # a short run that proves the pipeline end to end

Every variant trains with its recipe in configs/ (`--full`: the -full recipes) and the same budget (steps,
batch, max length, learning rate: the script stops if the recipes differ) and activates as many LoRA-expert
parameters per token as peft's LoRA: the expert rank is overridden to the value that matches peft's count
(the routers' own parameters come on top and are listed). PEDRO, IAPT, AdaLink and ALoRA keep the sizes of
their recipes (PEDRO, IAPT and ALoRA about peft's count; they have no -full recipes). One run folder per
variant and seed, <out>/<variant>-s<seed>: a finished run (metrics.json) is skipped, an interrupted one resumes from its
checkpoint, so the command can be stopped and started again. The results replace the part of `--results`
between this script's markers for the `--out` folder; plots go to `--figures`.

On a GPU the model is small enough that a training step is bound by kernel launches, not by the device: run
several at once with `--workers N` (each run in its own process), and bound the wall time with `--time-limit`
(no run starts after it; running ones are stopped and resume on the next call). `--report-only` writes the
report from the run folders there are, training nothing (for run folders made on another machine).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from train_step import expert_parameters_per_token, lora_parameters, matched_expert_rank  # noqa: E402

import loramix  # noqa: E402
from loramix.checkpoint import check_resumable  # noqa: E402
from loramix.data import Example, get_task  # noqa: E402
from loramix.evaluate import compare, evaluate_and_report  # noqa: E402
from loramix.models import load_model  # noqa: E402
from loramix.recipe import Recipe, load_recipe  # noqa: E402
from loramix.train import TrainingError, train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# variant -> (recipe in configs/, its own overrides)
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "lora": ("lora", ()),
    "soft": ("soft", ()),
    "topk": ("topk", ()),
    "remix": ("remix", ("mixlora.remix_samples=2",)),
    "task": ("task", ()),
    "prompt": ("prompt", ()),
    "contrastive": ("contrastive", ()),
    "remix-m4": ("remix", ("mixlora.remix_samples=4",)),
    "remix-m8": ("remix", ("mixlora.remix_samples=8",)),
    "pedro": ("pedro", ()),
    "iapt": ("iapt", ()),
    "adalink": ("adalink", ()),
    "alora": ("alora", ()),
}
LABELS = {
    "lora": "peft LoRA",
    "soft": "soft (MoLoRA)",
    "topk": "top-k (MixLoRA)",
    "remix": "ReMix, M=2",
    "task": "task (MOELoRA)",
    "prompt": "prompt (MiLoRA)",
    "contrastive": "contrastive (SparseDoctor)",
    "remix-m4": "ReMix, M=4",
    "remix-m8": "ReMix, M=8",
    "pedro": "PEDRO",
    "iapt": "IAPT",
    "adalink": "AdaLink",
    "alora": "ALoRA",
}
ADAPTER_SECTIONS = ("lora", "mixlora", "adapter")  # peft's LoRA, the mixture, a method of its own
IMBALANCE = ("soft", "topk", "contrastive", "remix")  # token-level routers whose ESS is compared
REMIX_SCALING = ("remix", "remix-m4", "remix-m8")
SAME_BUDGET = (
    "training",
    "max_length",
    "tasks",
    "sampling",
    "sampling_temperature",
    "batching",
    "system_prompt",
    "eval_examples",
    "model",
)


# ---- recipes ---------------------------------------------------------------------------------------------------
def recipe_path(variant: str, full: bool) -> Path:
    name = VARIANTS[variant][0]
    return ROOT / "configs" / f"{name}{'-full' if full else ''}.yaml"


def has_recipe(variant: str, full: bool) -> bool:
    return recipe_path(variant, full).is_file()


def for_recipe(settings: list[str], path: Path) -> list[str]:
    """The `--set` overrides that apply to the recipe at `path`: those of its own adapter section (`lora.`,
    `mixlora.` or a method's `adapter.`, the latter only for keys its recipe sets: methods have different
    settings) and every other one, so that one setting can reach every recipe."""
    recipe = yaml.safe_load(path.read_text()) or {}
    others = tuple(f"{section}." for section in ADAPTER_SECTIONS if section not in recipe)
    method_keys = {f"adapter.{key}" for key in recipe.get("adapter") or {}}
    return [
        setting
        for setting in settings
        if not setting.startswith(others)
        and (not setting.startswith("adapter.") or setting.split("=", 1)[0] in method_keys)
    ]


def run_overrides(steps: int | None, seed: int, eval_examples: int | None, recipe: Recipe) -> list[str]:
    """What every run sets: seed, test examples, the five trained tasks only; with `steps` (no time limit
    then) that many steps and ~40 logged ones."""
    overrides = [f"training.seed={seed}", "evaluation=[]"]
    if steps is not None:
        overrides += [f"training.steps={steps}", "training.time_limit=null"]
        overrides.append(f"training.log_every={max(1, steps // 40)}")
    if eval_examples is not None:
        overrides.append(f"eval_examples={eval_examples}")
    return overrides


@dataclass
class Counts:
    """A variant's parameter counts at its matched expert rank (None: a method sized by its own recipe)."""

    rank: int | None
    trainable: int
    active_experts: int
    active: int


def match_ranks(variants: list[str], full: bool, settings: list[str]) -> tuple[dict[str, list[str]], dict]:
    """Per variant: the overrides giving it peft's activated expert parameters per token, and its Counts. A
    method other than the mixture keeps its recipe's size (the recipes of configs/ are sized like peft's)."""
    recipes = {
        v: load_recipe(recipe_path(v, full), [*for_recipe(settings, recipe_path(v, full)), *VARIANTS[v][1]])
        for v in variants
    }
    lora = load_recipe(recipe_path("lora", full), for_recipe(settings, recipe_path("lora", full)))
    base, _ = load_model(lora.model)
    target = lora_parameters(base, lora.lora["target_modules"], lora.lora["r"], lora.lora.get("layers_to_transform"))
    overrides, counts = {}, {}
    for variant, recipe in recipes.items():
        if recipe.lora is not None:
            overrides[variant] = []
            counts[variant] = Counts(recipe.lora["r"], target, target, target)
            continue
        if recipe.method is not None:
            wrapped = loramix.wrap(base, recipe.adapter_config())
            parameters = wrapped.count_parameters()
            counts[variant] = Counts(None, parameters["trainable"], *[parameters["active_per_token"]] * 2)
            wrapped.unload()
            overrides[variant] = []
            continue
        rank = matched_expert_rank(base, recipe.mixlora_config(), target)
        config = loramix.MixLoraConfig.from_dict(recipe.mixlora_config().to_dict() | {"expert_rank": rank})
        wrapped = loramix.wrap(base, config)
        parameters = wrapped.count_parameters()
        counts[variant] = Counts(
            rank, parameters["trainable"], expert_parameters_per_token(wrapped), parameters["active_per_token"]
        )
        wrapped.unload()
        overrides[variant] = [f"mixlora.expert_rank={rank}"]
    return overrides, counts


def check_same_budget(recipes: dict[str, Recipe]) -> None:
    """Stop unless every variant's recipe has the same training budget and data."""
    first, *_ = recipes.values()
    for key in SAME_BUDGET:
        values = {name: getattr(r, key) for name, r in recipes.items()}
        if any(v != getattr(first, key) for v in values.values()):
            raise SystemExit(f"the recipes differ in {key}: {values}; the comparison needs the same budget")


# ---- runs ------------------------------------------------------------------------------------------------------
def has_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / name / "state.json").is_file() for name in ("checkpoint", ".checkpoint.previous"))


def is_finished(recipe: Recipe, run_dir: Path) -> bool:
    """Whether the run was trained and evaluated on the recipe's number of test examples."""
    metrics = run_dir / "metrics.json"
    return metrics.is_file() and json.loads(metrics.read_text())["meta"].get("max_examples") == recipe.eval_examples


def ensure_run(recipe: Recipe, run_dir: Path) -> str:
    """Train (or resume) and evaluate one run unless it is finished; says what it did."""
    if (run_dir / "recipe.yaml").is_file():
        check_resumable(recipe, run_dir)  # ValueError if the folder holds another experiment
        saved = load_recipe(run_dir / "recipe.yaml")
        if (run_dir / "training.json").is_file() and saved.training.steps != recipe.training.steps:
            raise SystemExit(
                f"{run_dir} finished with {saved.training.steps} steps, not {recipe.training.steps}: "
                "choose another --out"
            )
    if is_finished(recipe, run_dir):
        return "finished before: skipped"
    done = "evaluated"
    if not (run_dir / "training.json").is_file():
        resume = has_checkpoint(run_dir)
        if not resume and run_dir.exists():  # died before its first checkpoint: nothing to keep
            shutil.rmtree(run_dir)
        try:  # trained and evaluated as `loramix train` does (a time limit is the training's)
            train(recipe, run_dir, resume=resume)
        except TrainingError as error:
            return f"FAILED: {error}"
        done = "resumed, trained and evaluated" if resume else "trained and evaluated"
    else:
        evaluate_and_report(run_dir, recipe)
    return done


def run_in_workers(names: list[str], argv: list[str], out: Path, workers: int, time_limit: float | None) -> None:
    """Run each job (variant-sSEED) in its own process of this script, `workers` at a time, logging to
    <out>/<job>.log. With a `time_limit` (seconds), a job starts only while the median duration of the
    finished ones still fits, and the jobs running at the limit are stopped."""
    started, pending, running, durations = time.monotonic(), list(names), {}, []

    def fits(elapsed: float) -> bool:
        return time_limit is None or elapsed + (statistics.median(durations) if durations else 0) <= time_limit

    while pending or running:
        elapsed = time.monotonic() - started
        if time_limit is not None and elapsed > time_limit:
            for process, (name, _) in running.items():
                process.terminate()
                process.wait()
                print(f"{name}: stopped at the time limit ({elapsed:.0f} s); the next call resumes it", flush=True)
            running.clear()
        while pending and len(running) < workers and fits(elapsed):
            name = pending.pop(0)
            with open(out / f"{name}.log", "a") as log:
                command = [sys.executable, __file__, *argv, "--job", name]
                running[subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)] = (name, elapsed)
            print(f"{name}: started ({elapsed:.0f} s so far)", flush=True)
        if not running:
            break
        time.sleep(0.5)
        for process in [p for p in running if p.poll() is not None]:
            name, start = running.pop(process)
            now = time.monotonic() - started
            if process.returncode == 0:
                durations.append(now - start)
            status = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode}), see {name}.log"
            print(f"{name}: {status} ({now:.0f} s so far)", flush=True)
    if pending:
        print(f"not started (time limit): {', '.join(pending)}", flush=True)


# ---- reading the runs ------------------------------------------------------------------------------------------
@dataclass
class Run:
    """A run folder's metrics.json and history.jsonl."""

    variant: str
    seed: int
    metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    device: str | None = None
    predictions: list[dict] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)

    @classmethod
    def read(cls, out: Path, variant: str, seed: int) -> Run:
        folder = out / f"{variant}-s{seed}"
        metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}
        lines = (folder / "history.jsonl").read_text().splitlines() if (folder / "history.jsonl").is_file() else []
        training = json.loads((folder / "training.json").read_text()) if (folder / "training.json").is_file() else {}
        history = [json.loads(line) for line in lines if line.strip()]
        rows = folder / "predictions.jsonl"
        predictions = [json.loads(line) for line in rows.read_text().splitlines()] if rows.is_file() else []
        points = folder / "learning_curve.jsonl"
        curve = [json.loads(line) for line in points.read_text().splitlines() if line] if points.is_file() else []
        return cls(variant, seed, metrics, history, training.get("device"), predictions, curve)

    def task_predictions(self, task: str) -> dict[str, dict]:
        """This run's prediction rows of a task, by example id."""
        return {row["id"]: row for row in self.predictions if row["task"] == task}

    def scores(self, column: str = "model") -> dict[str, float]:
        """Each task's main (first) metric in a metrics.json column: model, zero_shot or majority."""
        tasks = self.metrics.get("tasks", {})
        return {task: next(iter(r[column].values())) for task, r in tasks.items() if r.get(column)}

    def interval(self, task: str) -> list[float] | None:
        """The 95% bootstrap interval of a task's main metric for the adapter (metrics.json)."""
        intervals = ((self.metrics.get("tasks") or {}).get(task) or {}).get("intervals", {}).get("model")
        return next(iter(intervals.values())) if intervals else None

    def seconds_per_step(self) -> float | None:
        """The median over logged intervals of training seconds per step."""
        points = [(0, 0.0)] + [(h["step"], h["seconds"]) for h in self.history]
        rates = [(s1 - s0) / (n1 - n0) for (n0, s0), (n1, s1) in zip(points, points[1:], strict=False) if n1 > n0]
        return statistics.median(rates) if rates else None


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def step_seconds(group: list[Run]) -> float | None:
    """Training seconds per step of a variant: the lowest over its seeds, as load on the machine only adds."""
    rates = [s for run in group if (s := run.seconds_per_step()) is not None]
    return min(rates) if rates else None


def format_score(values: list[float], interval: list[float] | None = None) -> str:
    """Mean ± std over seeds; one seed's score with its bootstrap interval where given."""
    if not values:
        return "—"
    mean, std = mean_std(values)
    if std is None:
        return f"{mean:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else f"{mean:.3f}"
    return f"{mean:.3f} ± {std:.3f}"


def average(scores: dict[str, float], tasks: list[str]) -> float | None:
    return statistics.mean(scores[t] for t in tasks) if tasks and all(t in scores for t in tasks) else None


def ess(weights: list[float]) -> float:
    """Effective support size (sum w)^2 / sum w^2."""
    array = np.asarray(weights, dtype=float)
    return float(array.sum() ** 2 / max((array**2).sum(), 1e-24))


def decoder_layer(module: str) -> int:
    match = re.search(r"\.(\d+)\.", module)
    return int(match.group(1)) if match else -1


# what an ESS measures: the routing weights within the chosen experts (per token), the router's distribution over
# all experts (per token), the experts' load over the tokens of the logged steps
ESS_MEASURES = {
    "weights": "token ESS of the routing weights",
    "probs": "token ESS of the router's distribution",
    "load": "ESS of the expert load",
}


def module_ess(record: dict, measure: str) -> dict[str, float]:
    """One history record's ESS per adapted module for an ESS_MEASURES key."""
    if measure == "load":
        return {m: ess(v) for m, v in record.get("load_per_layer", {}).items()}
    return record.get("probs_ess_per_layer" if measure == "probs" else "ess_per_layer", {})


def ess_grid(runs: list[Run], measure: str) -> tuple[list[int], list[int], np.ndarray]:
    """(steps, decoder layers, ESS array layers x steps) of an ESS_MEASURES key, averaged over the modules of a
    layer and the seeds (NaN where the runs did not log it)."""
    steps = sorted({h["step"] for run in runs for h in run.history})
    layers = sorted({decoder_layer(m) for run in runs for h in run.history for m in h.get("ess_per_layer", {})})
    total, count = np.zeros((len(layers), len(steps))), np.zeros((len(layers), len(steps)))
    for run in runs:
        for h in run.history:
            values = module_ess(h, measure)
            for module, value in values.items():
                index = layers.index(decoder_layer(module)), steps.index(h["step"])
                total[index] += value
                count[index] += 1
    with np.errstate(invalid="ignore"):
        return steps, layers, np.where(count > 0, total / np.maximum(count, 1), np.nan)


# ---- the report ------------------------------------------------------------------------------------------------
def score_table(runs: dict[str, list[Run]], counts: dict[str, Counts], tasks: list[str]) -> list[str]:
    peft = counts.get("lora")
    header = ["method", "expert rank", "trainable", "active expert params/token", "active incl. routers"]
    lines = [
        "| " + " | ".join([*header, *tasks, "average", "seeds", "s/step"]) + " |",
        "|" + "---|" * (len(header) + len(tasks) + 3),
    ]
    for variant, group in runs.items():
        finished = [r for r in group if r.metrics]
        c = counts[variant]
        rank = "—" if c.rank is None else c.rank
        ratio = f" ({c.active_experts / peft.active_experts:.3f}x)" if peft else ""
        per_task = [
            format_score(
                [r.scores()[t] for r in finished if t in r.scores()], finished[0].interval(t) if finished else None
            )
            for t in tasks
        ]
        averages = [a for r in finished if (a := average(r.scores(), tasks)) is not None]
        seconds = step_seconds(group)
        rate = f"{seconds:.2f}" if seconds is not None else "—"
        lines.append(
            f"| {LABELS[variant]} | {rank} | {c.trainable:,} | {c.active_experts:,}{ratio} | {c.active:,} | "
            + " | ".join(per_task)
            + f" | {format_score(averages)} | {len(finished)} | {rate} |"
        )
    reference = next((r for group in runs.values() for r in group if r.metrics), None)
    for column, label in (("zero_shot", "zero-shot (no adapter)"), ("majority", "majority answer")):
        scores = reference.scores(column) if reference else {}
        cells = [f"{scores[t]:.3f}" if t in scores else "—" for t in tasks]
        mean = average(scores, tasks)
        lines.append(
            f"| {label} | — | 0 | 0 | 0 | "
            + " | ".join(cells)
            + f" | {'—' if mean is None else f'{mean:.3f}'} | — | — |"
        )
    return lines


def paired_difference(run: Run, reference: Run, task: str) -> dict | None:
    """The paired-bootstrap difference of a task's main metric between two runs on the same test examples."""
    ours, theirs = run.task_predictions(task), reference.task_predictions(task)
    ids = [i for i in ours if i in theirs]
    if not ids:
        return None
    definition = get_task(task)
    examples = [Example(task, "", ours[i]["answer"], definition.choices, i) for i in ids]
    columns = {
        name: {"predictions": [rows[i]["prediction"] for i in ids]} for name, rows in (("run", ours), ("ref", theirs))
    }
    return compare(definition, examples, columns, against="run")["differences"]["ref"]


def difference_table(runs: dict[str, list[Run]], tasks: list[str], reference: str = "lora") -> list[str]:
    """Per method and seed, each task's main-metric difference from `reference` of the same seed, with its 95%
    paired-bootstrap interval: ✓ above zero, ✗ below, · neither (not beyond noise)."""
    lines = ["| method | seed | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    references = {r.seed: r for r in runs.get(reference, []) if r.predictions}
    for variant, group in runs.items():
        for run in group:
            other = references.get(run.seed)
            if variant == reference or other is None or not run.predictions:
                continue
            cells = []
            for task in tasks:
                difference = paired_difference(run, other, task)
                if difference is None:
                    cells.append("—")
                    continue
                mark = "✓" if difference["low"] > 0 else "✗" if difference["high"] < 0 else "·"
                low, high = difference["low"], difference["high"]
                cells.append(f"{difference['difference']:+.3f} [{low:+.3f}, {high:+.3f}] {mark}")
            lines.append(f"| {LABELS[variant]} | {run.seed} | " + " | ".join(cells) + " |")
    return lines if len(lines) > 2 else []


def ess_ceiling(variant: str, measure: str, runs: list[Run]) -> int:
    """The largest ESS a measure can take: k for the weights of a top-k router, n otherwise."""
    experts = max((len(v) for r in runs for h in r.history for v in h.get("load_per_layer", {}).values()), default=8)
    return 2 if measure == "weights" and variant != "soft" else experts


def imbalance_table(runs: dict[str, list[Run]]) -> list[str]:
    """Per router, at its first, middle and last logged step: each ESS measure's mean over modules (and the lowest
    decoder layer's mean) against its ceiling."""
    names = list(ESS_MEASURES)
    lines = [
        "| router | step | " + " | ".join(f"{ESS_MEASURES[m]}: mean (lowest layer) / max" for m in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for variant in IMBALANCE:
        group = [r for r in runs.get(variant, []) if r.history]
        if not group:
            continue
        grids = {m: ess_grid(group, m) for m in names}
        steps = grids["weights"][0]
        for column in sorted({0, len(steps) // 2, len(steps) - 1}):
            cells = []
            for m in names:
                values = grids[m][2][:, column]
                ceiling = ess_ceiling(variant, m, group)
                cells.append(
                    "—" if np.isnan(values).all() else f"{np.nanmean(values):.2f} ({np.nanmin(values):.2f}) / {ceiling}"
                )
            lines.append(f"| {LABELS[variant]} | {steps[column]} | " + " | ".join(cells) + " |")
    return lines


def scaling_table(runs: dict[str, list[Run]], tasks: list[str]) -> list[str]:
    lines = ["| M | average score | s/step | step time vs M=2 | M / 2 |", "|---|---|---|---|---|"]
    reference = None
    for variant, samples in zip(REMIX_SCALING, (2, 4, 8), strict=True):
        group = runs.get(variant, [])
        if not group:
            continue
        averages = [a for r in group if r.metrics and (a := average(r.scores(), tasks)) is not None]
        rate = step_seconds(group)
        reference = reference or (rate if samples == 2 else None)
        ratio = f"{rate / reference:.2f}x" if rate and reference else "—"
        lines.append(
            f"| {samples} | {format_score(averages)} | {'—' if rate is None else f'{rate:.2f}'} | {ratio} "
            f"| {samples // 2}x |"
        )
    return lines


def plot_scores(runs: dict[str, list[Run]], tasks: list[str], path: Path) -> None:
    columns = [*tasks, "average"]
    reference = next((r for group in runs.values() for r in group if r.metrics), None)
    bars: dict[str, list[list[float]]] = {}
    for variant, group in runs.items():
        scores = [r.scores() for r in group if r.metrics]
        bars[LABELS[variant]] = [[s[t] for s in scores if t in s] for t in tasks] + [
            [a for s in scores if (a := average(s, tasks)) is not None]
        ]
    for column, label in (("zero_shot", "zero-shot"), ("majority", "majority")):
        scores = reference.scores(column) if reference else {}
        bars[label] = [[scores[t]] if t in scores else [] for t in tasks] + [
            [a] if (a := average(scores, tasks)) is not None else []
        ]
    figure, axis = plt.subplots(figsize=(max(8, 1.6 * len(columns) * len(bars) / 4), 4.5))
    width = 0.8 / len(bars)
    for index, (label, values) in enumerate(bars.items()):
        means = [np.mean(v) if v else np.nan for v in values]
        errors = [np.std(v, ddof=1) if len(v) > 1 else 0 for v in values]
        axis.bar(np.arange(len(columns)) + index * width, means, width, yerr=errors, label=label, capsize=2)
    axis.set_xticks(np.arange(len(columns)) + 0.4 - width / 2, columns, rotation=15)
    axis.set_ylabel("main metric (mean ± std over seeds)")
    axis.legend(fontsize=7, ncol=2)
    save(figure, path)


def plot_imbalance(runs: dict[str, list[Run]], path: Path) -> bool:
    """Heatmaps, decoder layer x step, of every ESS measure (rows) of every router (columns)."""
    routers = [v for v in IMBALANCE if any(r.history for r in runs.get(v, []))]
    if not routers:
        return False
    figure, axes = plt.subplots(3, len(routers), figsize=(3.6 * len(routers), 9.5), squeeze=False)
    for column, variant in enumerate(routers):
        group = [r for r in runs[variant] if r.history]
        for row, (measure, title) in enumerate(ESS_MEASURES.items()):
            steps, layers, grid = ess_grid(group, measure)
            top = ess_ceiling(variant, measure, group)
            axis = axes[row][column]
            image = axis.imshow(grid, aspect="auto", origin="lower", vmin=1, vmax=top, cmap="viridis")
            ticks = np.linspace(0, len(steps) - 1, min(5, len(steps))).astype(int)
            axis.set_xticks(ticks, [steps[t] for t in ticks])
            axis.set_yticks(
                range(0, len(layers), max(1, len(layers) // 6)),
                [layers[i] for i in range(0, len(layers), max(1, len(layers) // 6))],
            )
            axis.set_title(f"{LABELS[variant]}\n{title} (1..{top})", fontsize=8)
            axis.set_xlabel("step", fontsize=8)
            axis.set_ylabel("decoder layer", fontsize=8)
            figure.colorbar(image, ax=axis)
    save(figure, path)
    return True


def plot_ess_curves(runs: dict[str, list[Run]], path: Path) -> bool:
    """The paper's imbalance figure: each ESS measure against steps, one line per router (its mean over decoder
    layers, the band from its lowest to its highest layer); ReMix's weights ESS (k by construction) is the
    reference."""
    routers = [v for v in IMBALANCE if any(r.history for r in runs.get(v, []))]
    if not routers:
        return False
    figure, axes = plt.subplots(1, len(ESS_MEASURES), figsize=(4.2 * len(ESS_MEASURES), 3.6))
    for axis, (measure, title) in zip(axes, ESS_MEASURES.items(), strict=True):
        for variant in routers:
            steps, _, grid = ess_grid([r for r in runs[variant] if r.history], measure)
            if np.isnan(grid).all():
                continue
            line = axis.plot(steps, np.nanmean(grid, 0), label=LABELS[variant])[0]
            axis.fill_between(steps, np.nanmin(grid, 0), np.nanmax(grid, 0), color=line.get_color(), alpha=0.15)
        axis.set(xlabel="step", ylabel="ESS", title=title)
        axis.title.set_fontsize(9)
        axis.legend(fontsize=7)
    save(figure, path)
    return True


def plot_learning_curves(runs: dict[str, list[Run]], tasks: list[str], path: Path) -> bool:
    """Each task's main metric on its dev examples against steps (learning_curve.jsonl), one line per method."""
    if not any(r.curve for group in runs.values() for r in group):
        return False
    figure, axes = plt.subplots(1, len(tasks), figsize=(3.8 * len(tasks), 3.4), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        for variant, group in runs.items():
            points = [
                (p["step"], next(iter(p["tasks"][task].values()))) for r in group for p in r.curve if task in p["tasks"]
            ]
            if points:
                steps = sorted({s for s, _ in points})
                axis.plot(
                    steps,
                    [np.mean([v for s, v in points if s == step]) for step in steps],
                    marker=".",
                    label=LABELS[variant],
                )
        axis.set(xlabel="step", title=f"{task} (dev)")
        axis.title.set_fontsize(9)
    axes[0][0].set_ylabel("main metric")
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    save(figure, path)
    return True


def plot_scaling(runs: dict[str, list[Run]], tasks: list[str], path: Path) -> bool:
    points = []
    for variant, samples in zip(REMIX_SCALING, (2, 4, 8), strict=True):
        group = runs.get(variant, [])
        averages = [a for r in group if r.metrics and (a := average(r.scores(), tasks)) is not None]
        rate = step_seconds(group)
        if averages and rate is not None:
            points.append((samples, np.mean(averages), np.std(averages), rate))
    if len(points) < 2:
        return False
    samples, means, stds, rates = zip(*points, strict=True)
    figure, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    left.errorbar(samples, means, yerr=stds, marker="o", capsize=3)
    left.set(xlabel="routing samples M", ylabel="average main metric", xticks=samples)
    right.plot(samples, rates, marker="o", label="measured")
    right.plot(samples, [rates[0] * m / samples[0] for m in samples], "--", label="linear in M")
    right.set(xlabel="routing samples M", ylabel="training s/step", xticks=samples)
    right.legend()
    save(figure, path)
    return True


def plot_losses(runs: dict[str, list[Run]], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 4))
    for variant, group in runs.items():
        curves = [[(h["step"], h["ce"]) for h in r.history] for r in group if r.history]
        if curves:
            steps = [s for s, _ in curves[0]]
            values = [np.mean([c[i][1] for c in curves if len(c) > i]) for i in range(len(steps))]
            axis.plot(steps, values, label=LABELS[variant])
    axis.set(xlabel="step", ylabel="answer cross-entropy (mean over seeds)")
    axis.legend(fontsize=7)
    save(figure, path)


def save(figure: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markers(section: str) -> tuple[str, str]:
    """The comments around the report of the run folders in `section` (the --out folder's name) in --results."""
    return f"<!-- accuracy.py {section}: begin -->", f"<!-- accuracy.py {section}: end -->"


def write_report(
    runs: dict[str, list[Run]],
    counts: dict[str, Counts],
    recipe: Recipe,
    command: str,
    figures: Path,
    results: Path,
    section_name: str,
) -> str:
    """The markdown section of the results (and its plots); spliced into `results` between the markers."""
    tasks = list(recipe.tasks)
    begin, end = markers(section_name)
    devices = sorted({r.device for group in runs.values() for r in group if r.device})
    where = ", ".join(devices) if devices else f"{torch.get_num_threads()} threads"

    def link(name: str) -> str:
        return Path(os.path.relpath(figures / name, results.parent)).as_posix()

    settings = recipe.training
    lines = [
        begin,
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d')} (trained on {where}).",
        "",
        f"Model {recipe.model}; tasks {', '.join(tasks)}; "
        + (f"training time limit {settings.time_limit}, at most " if settings.time_limit else "")
        + f"{settings.steps} steps of batch {settings.batch_size} x "
        f"{settings.grad_accumulation} (max length {recipe.max_length}, lr {settings.lr}, {settings.schedule}, bf16 "
        f"autocast {settings.bf16}); {recipe.eval_examples or 'all'} test examples per task; seeds "
        f"{sorted({r.seed for g in runs.values() for r in g})}. Scores: each task's main metric, mean ± std over "
        "seeds; s/step: median training seconds per step from history.jsonl, the lowest over seeds (other work on "
        "the machine only slows a run down).",
        "",
        *score_table(runs, counts, tasks),
        "",
        "Differences from peft LoRA of the same seed on the same test examples (the main metric, 95% paired "
        "bootstrap): ✓ better beyond noise, ✗ worse beyond noise, · within noise.",
        "",
        *difference_table(runs, tasks),
        "",
    ]
    if "remix" in runs and "topk" in runs:
        lines += ["The same against MixLoRA top-k (is ReMix ahead of the learned router it replaces?):", ""]
        lines += [*difference_table(runs, tasks, reference="topk"), ""]
    if plot_learning_curves(runs, tasks, figures / "learning_curves.png"):
        lines += ["Learning curves on the dev examples:", "", f"![learning curves]({link('learning_curves.png')})", ""]
    plot_scores(runs, tasks, figures / "accuracy.png")
    plot_losses(runs, figures / "training_loss.png")
    lines += [f"![scores]({link('accuracy.png')}) ![training loss]({link('training_loss.png')})", ""]
    if plot_imbalance(runs, figures / "routing_ess.png"):
        lines += ["Routing imbalance (first, middle and last logged step, averaged over seeds):", ""]
        lines += [*imbalance_table(runs), "", f"![routing ESS]({link('routing_ess.png')})", ""]
        if plot_ess_curves(runs, figures / "routing_ess_curves.png"):
            lines += [f"![routing ESS over training]({link('routing_ess_curves.png')})", ""]
    if any(runs.get(v) for v in REMIX_SCALING[1:]):
        lines += ["ReMix routing samples M (same steps):", "", *scaling_table(runs, tasks), ""]
        more = {v: runs[v] for v in REMIX_SCALING if runs.get(v)}
        lines += [
            "The same against ReMix M=2 (do more samples help?):",
            "",
            *difference_table(more, tasks, "remix"),
            "",
        ]
        if plot_scaling(runs, tasks, figures / "remix_samples.png"):
            lines += [f"![ReMix samples]({link('remix_samples.png')})", ""]
    lines.append(end)
    section = "\n".join(lines)
    write_between_markers(results, section, begin, end)
    return section


def write_between_markers(report: Path, section: str, begin: str, end: str, title: str = "# Results") -> None:
    """Put `section` (which starts with `begin` and ends with `end`) in place of the report's text between those
    markers, or at its end; a missing report starts with `title`."""
    text = report.read_text() if report.is_file() else title + "\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text)


# ---- main ------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--recipes", default=None, help=f"comma-separated, of {list(VARIANTS)} (default: all that have the recipe)"
    )
    parser.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    parser.add_argument("--steps", type=int, default=None, help="steps, no time limit (default: recipes')")
    parser.add_argument("--eval-examples", type=int, default=None, help="test examples per task (default: recipes')")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "accuracy", help="folder of the run folders")
    parser.add_argument("--full", action="store_true", help="use the configs/*-full.yaml recipes (a GPU's job)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every recipe")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "RESULTS.md")
    parser.add_argument("--figures", type=Path, default=ROOT / "docs" / "figures")
    parser.add_argument("--workers", type=int, default=1, help="runs at a time, each in its own process")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds; then stop (resumable)")
    parser.add_argument("--report-only", action="store_true", help="report the run folders there are; train none")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)  # VARIANT-sSEED: one run, in a worker
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, not {args.workers}")
    variants = args.recipes.split(",") if args.recipes else [v for v in VARIANTS if has_recipe(v, args.full)]
    if unknown := [v for v in variants if v not in VARIANTS]:
        parser.error(f"unknown recipes {unknown}; known: {list(VARIANTS)}")
    if missing := [v for v in variants if not has_recipe(v, args.full)]:
        parser.error(f"no recipe for {missing}: {', '.join(str(recipe_path(v, args.full)) for v in missing)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    if "lora" not in variants:
        variants.insert(0, "lora")  # the reference of the parameter counts and the comparison

    rank_overrides, counts = match_ranks(variants, args.full, args.set)
    jobs = []
    for seed in seeds:
        recipes = {}
        for variant in variants:
            path = recipe_path(variant, args.full)
            own = [*for_recipe(args.set, path), *VARIANTS[variant][1], *rank_overrides[variant]]
            plain = load_recipe(path, own)
            own += [f"name={variant}-s{seed}", *run_overrides(args.steps, seed, args.eval_examples, plain)]
            recipes[variant] = load_recipe(path, own)
        check_same_budget(recipes)
        jobs += [(variant, seed, recipe) for variant, recipe in recipes.items()]

    args.out.mkdir(parents=True, exist_ok=True)
    if args.job is not None:
        recipe = next(recipe for variant, seed, recipe in jobs if f"{variant}-s{seed}" == args.job)
        print(f"{args.job}: {ensure_run(recipe, args.out / args.job)}", flush=True)
        return ""
    if not args.report_only and (args.workers > 1 or args.time_limit is not None):
        todo = [f"{v}-s{s}" for v, s, recipe in jobs if not is_finished(recipe, args.out / f"{v}-s{s}")]
        run_in_workers(todo, argv, args.out, args.workers, args.time_limit)
    elif not args.report_only:
        started = time.perf_counter()
        for index, (variant, seed, recipe) in enumerate(jobs, 1):
            run_dir = args.out / f"{variant}-s{seed}"
            print(f"[{index}/{len(jobs)}] {run_dir} ({time.perf_counter() - started:.0f} s so far)", flush=True)
            done = ensure_run(recipe, run_dir)
            print(f"[{index}/{len(jobs)}] {run_dir}: {done}", flush=True)

    runs = {v: [Run.read(args.out, v, s) for s in seeds] for v in variants}
    command = shlex.join(["python", "benchmarks/accuracy.py", *argv])
    section = write_report(runs, counts, jobs[0][2], command, args.figures, args.results, args.out.name)
    (args.out / "accuracy.md").write_text(section + "\n")
    print(section)
    return section


if __name__ == "__main__":
    main()
