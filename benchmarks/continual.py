"""Continual learning on the five trainable medical tasks: they arrive one at a time, each stage trains for the same
time, and after every stage every task seen so far is scored (accuracy matrix R[stage][task]).

    python benchmarks/continual.py                     # the measurement: 5 minutes per stage (hours on a CPU)
    python benchmarks/continual.py --quick             # a few steps per stage, 4 test examples: the pipeline only

Variants (`--variants`), one chain of run folders each under --out:
  sequential-lora  one peft LoRA (configs/lora.yaml) fine-tuned on each new task in turn (`init_from`): it forgets
  gate-rows        MOELoRA's `task` router (configs/task.yaml) on the first task, then each task added by a new gate
                   row over the frozen experts (`continue_from`, `continual.new_experts: 0`; configs/continual.yaml)
  new-experts      the same first run, then each task added with `--new-experts` LoRA experts of its own per layer,
                   routed over those and every frozen expert
  own-experts      the same, each task routed over its new experts alone (`continual.reuse_experts: false`)
  joint            the `task` router trained on all five at once for the five stages' time: the upper bound
With new-experts and own-experts, the learnable tasks (the last three) are each also trained alone, by a fresh
`task`-router run of `--new-experts` experts (same rank and expert scale) for one stage's time (folder single/), for
the paired comparison.

An old task of a `task`-router chain is not scored again: its first `--check-examples` test examples are scored on
their own after every stage (a probe), and when the probe's predictions and choice log-likelihoods are those of the
stage before, the task's rows are taken over from it (its score cannot have changed); otherwise it is scored again.
Stages whose scores.json exists are skipped, a stopped training resumes from its checkpoint, and with --time-limit no
stage starts after the limit (run the command again to go on). The report goes between this script's markers in
--results (default with --quick: <out>/continual.md, so that a pipeline check is never mistaken for a measurement).

Definitions (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory", section 4; T tasks, R[i][j] the score on task j
after stage i, b_j the base model's zero-shot score on task j):
  ACC = mean_j R[T][j];  BWT = mean_{j<T} (R[T][j] - R[j][j]);  FWT = mean_{j>1} (R[j-1][j] - b_j).
FWT needs a score on a task before its stage: only the sequential LoRA can answer a task it has not trained on (a
`task` router has no id for it), so the routed variants show none. Instead, for every variant, the score on each
learnable task right after its stage is compared with the single-task run's (R[j][j] - S_j, paired bootstrap).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from accuracy import Run, for_recipe, has_checkpoint, paired_difference, save, write_between_markers  # noqa: E402
from safetensors import safe_open  # noqa: E402

from loramix.evaluate import predict_run  # noqa: E402
from loramix.recipe import Recipe, load_recipe  # noqa: E402
from loramix.train import train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ORDER = ("pubmedqa", "mediqa_rqe", "medical_abstracts", "symptom2disease", "ncbi_disease")
LEARNABLE = ORDER[2:]
VARIANTS = ("sequential-lora", "gate-rows", "new-experts", "own-experts", "joint")
LABELS = {
    "sequential-lora": "(a) sequential peft LoRA",
    "gate-rows": "(b) new gate rows only",
    "new-experts": "(c) new experts",
    "own-experts": "(c') new experts used alone",
    "joint": "(d) joint, all tasks at once (upper bound)",
}
ROUTED = ("gate-rows", "new-experts", "own-experts")  # old tasks provably unchanged: rows reused after a probe
QUICK = {"steps": 3, "eval_examples": 4, "check_examples": 2}


@dataclass
class Settings:
    """What every stage shares."""

    stage_minutes: float
    steps: int | None  # a fixed step count instead of the time (--quick)
    eval_examples: int
    check_examples: int
    new_experts: int
    seed: int
    order: tuple[str, ...] = ORDER  # the tasks, in the order they arrive
    single: tuple[str, ...] = LEARNABLE  # the tasks that also get a single-task run
    overrides: tuple[str, ...] = ()  # --set: for every recipe that has the key's section (accuracy.for_recipe)


# ---- recipes ---------------------------------------------------------------------------------------------------
def budget(settings: Settings, stages: int = 1) -> list[str]:
    """Overrides for `stages` stages' training (time, or steps with --quick) and the scoring every run shares."""
    common = [f"training.seed={settings.seed}", "dev_examples=0", f"eval_examples={settings.eval_examples}"]
    if settings.steps is not None:
        steps = settings.steps * stages
        return [*common, f"training.steps={steps}", "training.time_limit=null", "training.log_every=1"]
    return [*common, "training.steps=100000", f"training.time_limit={settings.stage_minutes * stages * 60:g}s"]


def config(name: str, own: list[str], settings: Settings) -> Recipe:
    """configs/<name>.yaml with the --set overrides that fit it, then the benchmark's own."""
    path = ROOT / "configs" / f"{name}.yaml"
    return load_recipe(path, [*for_recipe(list(settings.overrides), path), *own])


def listed(tasks: list[str] | tuple[str, ...]) -> str:
    return "[" + ",".join(tasks) + "]"


def stage_recipe(variant: str, stage: int, settings: Settings, out: Path) -> Recipe:
    """The recipe of a variant's stage (1-based): its new task, and how it starts from the stage before."""
    order = settings.order
    tasks, new = list(order[:stage]), order[stage - 1]
    own = [f"name={variant}-{stage}-{new}", *budget(settings)]
    if variant == "sequential-lora":  # trains the new task alone; scores the others (and the next one, for FWT)
        others = [t for t in order[: stage + 1] if t != new]
        own += [f"tasks=[{new}]", f"evaluation={listed(others)}"]
        if stage > 1:
            own.append(f"init_from={stage_dir(variant, stage - 1, out, order)}")
        return config("lora", own, settings)
    if stage == 1:  # the first run of both routed chains
        return config("task", [*own, f"tasks={listed(tasks)}"], settings)
    experts = settings.new_experts if variant in ("new-experts", "own-experts") else 0
    own += [f"tasks={listed(tasks)}", f"continue_from={stage_dir(variant, stage - 1, out, order)}"]
    own.append(f"continual.new_experts={experts}")
    if experts:  # the experts' learning rate, as the single-task runs they are compared with
        own.append(f"continual.reuse_experts={'false' if variant == 'own-experts' else 'true'}")
        own.append(f"training.lr={config('task', [], settings).training.lr}")
    else:  # an embedding row alone: a larger step
        own.append("training.lr=1e-2")
    return config("continual", own, settings)


def joint_recipe(settings: Settings) -> Recipe:
    own = ["name=joint", f"tasks={listed(settings.order)}", *budget(settings, stages=len(settings.order))]
    return config("task", own, settings)


def single_recipe(task: str, settings: Settings) -> Recipe:
    """A fresh `task`-router run on one task with as many experts as a continuation adds, of the same rank and the
    same expert scale alpha / (n r) as the continued run's experts."""
    base = config("task", [], settings)
    alpha = base.mixlora["alpha"] * settings.new_experts / base.mixlora["num_experts"]
    own = [f"name=single-{task}", f"tasks=[{task}]", *budget(settings)]
    own += [f"mixlora.num_experts={settings.new_experts}", f"mixlora.alpha={alpha:g}"]
    return config("task", own, settings)


def stage_dir(variant: str, stage: int, out: Path, order: tuple[str, ...]) -> Path:
    """A stage's run folder; the routed variants share their first run."""
    if variant in ROUTED and stage == 1:
        return out / "first" / f"1-{order[0]}"
    return out / variant / f"{stage}-{order[stage - 1]}"


# ---- training and scoring --------------------------------------------------------------------------------------
def train_stage(recipe: Recipe, run_dir: Path) -> str:
    """Train a run unless it finished (training.json); resume it from its checkpoint if it was stopped."""
    if (run_dir / "training.json").is_file():
        return "trained before"
    resume = has_checkpoint(run_dir)
    if not resume and run_dir.exists():  # stopped before its first checkpoint: nothing to keep
        shutil.rmtree(run_dir)
    train(recipe, run_dir, resume=resume, evaluate=False)
    return "resumed and trained" if resume else "trained"


def main_metric(metrics: dict) -> float:
    return next(iter(metrics.values()))


def same_rows(before: list[dict], after: list[dict]) -> bool:
    """Whether two probes predicted alike: the same examples, predictions, choice log-likelihoods (as stored, 4
    decimals) and generated texts."""
    keys = ("id", "prediction", "prediction_norm", "choice_scores", "output")
    return len(before) == len(after) and all(
        {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys} for a, b in zip(before, after, strict=True)
    )


def score_stage(run_dir: Path, tasks: list[str], new: str | None, previous: dict | None, probe: bool, settings) -> dict:
    """Score a stage's run on `tasks` (scores.json): per task its main metric and test rows, and for the tasks not
    seen before (`new`, or all without `previous`) its zero-shot score. With `probe` (a routed chain), every task
    gets a probe, and an old task (scored at `previous`) keeps the rows of the stage before when its probe is
    unchanged ("reused": true)."""
    old = [t for t in tasks if probe and previous is not None and t in previous["tasks"]]
    wanted = {t: settings.eval_examples for t in tasks if t not in old} | {t: settings.check_examples for t in old}
    fresh = [t for t in tasks if t not in old and (previous is None or t not in previous["tasks"] or t == new)]
    scored = predict_run(run_dir, wanted, zero_shot=fresh)
    results = {}
    for task in tasks:
        if task in old and same_rows(previous["tasks"][task]["probe"], scored[task]["rows"]):
            results[task] = previous["tasks"][task] | {"reused": True}
            continue
        result = scored[task]
        if task in old:
            print(f"  {task}: its probe changed; scored again", flush=True)
            result = predict_run(run_dir, {task: settings.eval_examples})[task] | {"probe": scored[task]["rows"]}
        results[task] = {"score": main_metric(result["metrics"]), "rows": result["rows"], "reused": False}
        if "zero_shot" in result:
            results[task]["zero_shot"] = main_metric(result["zero_shot"])
        if "probe" in result:
            results[task]["probe"] = result["probe"]
    if probe:  # the probes of tasks scored in full, each scored on its own, as later stages will score it
        unprobed = {t: settings.check_examples for t in tasks if "probe" not in results[t]}
        for task, result in (predict_run(run_dir, unprobed) if unprobed else {}).items():
            results[task]["probe"] = result["rows"]
    scores = {"settings": scoring(settings), "tasks": results, "parameters": adapter_parameters(run_dir)}
    (run_dir / "scores.json").write_text(json.dumps(scores))
    return scores


def trained_steps(run_dir: Path) -> int:
    """The optimizer steps a stage's run took in its time (training.json)."""
    return json.loads((run_dir / "training.json").read_text())["steps"]


def scoring(settings: Settings) -> dict:
    return {"eval_examples": settings.eval_examples, "check_examples": settings.check_examples}


def adapter_parameters(run_dir: Path) -> int:
    """The parameters the run's adapter stores (its safetensors files)."""
    total = 0
    for path in sorted((run_dir / "adapter").glob("*.safetensors")):
        with safe_open(path, "pt") as tensors:
            total += sum(math.prod(tensors.get_slice(name).get_shape()) for name in tensors.keys())  # noqa: SIM118
    return total


# ---- the continual-learning measures ----------------------------------------------------------------------------
def average_accuracy(matrix: list[dict[str, float]]) -> float:
    """ACC: the mean score over every task after the last stage."""
    return float(np.mean(list(matrix[-1].values())))


def backward_transfer(matrix: list[dict[str, float]], tasks: list[str]) -> float | None:
    """BWT: mean over all tasks but the last of (score after the last stage - score right after its own stage)."""
    if len(matrix) < 2:
        return None
    return float(np.mean([matrix[-1][t] - matrix[i][t] for i, t in enumerate(tasks[:-1])]))


def forward_transfer(matrix: list[dict[str, float]], tasks: list[str], zero_shot: dict[str, float]) -> float | None:
    """FWT: mean over all tasks but the first of (score before its stage, after the one before - its zero-shot
    score); None when a task was not scored before its stage."""
    gains = [matrix[i - 1].get(t, math.nan) - zero_shot.get(t, math.nan) for i, t in enumerate(tasks) if i > 0]
    return None if not gains or any(math.isnan(g) for g in gains) else float(np.mean(gains))


def seen_matrix(stages: list[dict], tasks: list[str]) -> list[dict[str, float]]:
    """R as a list of stages, each {task: score} (the sequential LoRA's look-ahead scores included)."""
    return [{t: r["score"] for t, r in stage["tasks"].items() if t in tasks} for stage in stages]


# ---- the report ------------------------------------------------------------------------------------------------
def as_run(name: str, stage: dict) -> Run:
    return Run(name, 0, predictions=[row for result in stage["tasks"].values() for row in result["rows"]])


def fmt(value: float | None, sign: bool = False) -> str:
    return "—" if value is None else f"{value:+.3f}" if sign else f"{value:.3f}"


def matrix_table(variant: str, stages: list[dict], order: tuple[str, ...]) -> list[str]:
    lines = [
        f"**{LABELS[variant]}**",
        "",
        "| after stage | " + " | ".join(order) + " |",
        "|---|" + "---:|" * len(order),
    ]
    for index, stage in enumerate(stages):
        added = "all" if variant == "joint" else f"{index + 1}: {order[index]}"
        cells = []
        for task in order:
            result = stage["tasks"].get(task)
            seen = variant == "joint" or order.index(task) <= index
            mark = "" if result is None else " (reused)" if result.get("reused") else "" if seen else " (unseen)"
            cells.append("" if result is None else f"{result['score']:.3f}{mark}")
        lines.append(f"| {added} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def summary_rows(results: dict[str, list[dict]], zero_shot: dict[str, float], order: tuple[str, ...]) -> list[str]:
    lines = [
        "| variant | stages | ACC | BWT | FWT (GEM) | adapter parameters after each stage (+ added) | steps per stage "
        "| old tasks |",
        "|---|---:|---:|---:|---:|---|---|---|",
    ]
    for variant, stages in results.items():
        tasks = list(order) if variant == "joint" else list(order[: len(stages)])
        matrix = seen_matrix(stages, tasks)
        final = {t: matrix[-1][t] for t in tasks if t in matrix[-1]}
        acc = average_accuracy([final]) if final else None
        bwt = None if variant == "joint" else backward_transfer(matrix, tasks)
        fwt = None if variant == "joint" else forward_transfer(matrix, tasks, zero_shot)
        counts = [s["parameters"] for s in stages]
        growth = ", ".join(f"{counts[0]:,}" if i == 0 else f"+{c - counts[i - 1]:,}" for i, c in enumerate(counts))
        reused = sum(r.get("reused", False) for s in stages for r in s["tasks"].values())
        rescored = sum(
            1
            for i, s in enumerate(stages)
            for t, r in s["tasks"].items()
            if i and t != order[i] and not r.get("reused")
        )
        checked = f"{reused} reused after their probe, {rescored} scored again" if variant in ROUTED else "scored again"
        if variant == "joint":
            checked = "—"
        lines.append(
            f"| {LABELS[variant]} | {len(stages)} | {fmt(acc)} | {fmt(bwt, True)} | {fmt(fwt, True)} | {growth} "
            f"| {', '.join(str(s['steps']) for s in stages)} | {checked} |"
        )
    return lines


def single_rows(results: dict[str, list[dict]], singles: dict[str, dict], order: tuple[str, ...]) -> list[str]:
    """Each variant's score on a learnable task right after its stage against the single-task run's."""
    learnable = [t for t in order if t in singles]
    lines = ["| variant | " + " | ".join(f"{t}: R[j][j] − single [95% CI]" for t in learnable) + " |"]
    lines.append("|---|" + "---|" * len(learnable))
    scores = " | ".join(fmt(singles[t]["tasks"][t]["score"]) if t in singles else "—" for t in learnable)
    lines.append(f"| single-task `task` router (reference) | {scores} |")
    steps = " | ".join(f"{singles[t]['steps']} steps" if t in singles else "—" for t in learnable)
    lines.append(f"| (single-task run's steps) | {steps} |")
    for variant, stages in results.items():
        if variant == "joint":
            continue
        cells = []
        for task in learnable:
            stage = order.index(task)
            if stage >= len(stages) or task not in singles:
                cells.append("—")
                continue
            d = paired_difference(as_run(variant, stages[stage]), as_run("single", singles[task]), task)
            if d is None:
                cells.append("—")
                continue
            mark = "✓" if d["low"] > 0 else "✗" if d["high"] < 0 else "·"
            score, interval = stages[stage]["tasks"][task]["score"], f"[{d['low']:+.3f}, {d['high']:+.3f}]"
            cells.append(f"{score:.3f}: {d['difference']:+.3f} {interval} {mark}")
        lines.append(f"| {LABELS[variant]} | " + " | ".join(cells) + " |")
    return lines


def plot_matrices(results: dict[str, list[dict]], path: Path, order: tuple[str, ...]) -> None:
    """One heatmap per variant: stages down, tasks across, unseen tasks blank."""
    figure, axes = plt.subplots(1, len(results), figsize=(3.6 * len(results), 3.6), squeeze=False)
    for axis, (variant, stages) in zip(axes[0], results.items(), strict=True):
        grid = np.full((len(stages), len(order)), np.nan)
        for i, stage in enumerate(stages):
            for j, task in enumerate(order):
                if task in stage["tasks"] and (variant == "joint" or j <= i):
                    grid[i, j] = stage["tasks"][task]["score"]
        axis.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w" if value < 0.6 else "k")
        axis.set_xticks(range(len(order)), [t.replace("_", "\n") for t in order], fontsize=6)
        rows = ["all"] if variant == "joint" else [str(i + 1) for i in range(len(stages))]
        axis.set_yticks(range(len(stages)), rows)
        axis.set(title=LABELS[variant], ylabel="after stage")
        axis.title.set_fontsize(8)
    save(figure, path)


def markers(section: str) -> tuple[str, str]:
    return f"<!-- continual.py {section}: begin -->", f"<!-- continual.py {section}: end -->"


def write_report(results, singles, zero_shot, settings, command, figures: Path, report: Path, section: str) -> str:
    begin, end = markers(section)
    results = {variant: stages for variant, stages in results.items() if stages}  # a time limit may leave none
    if results:
        plot_matrices(results, figures / "continual.png", settings.order)
    time_per_stage = f"{settings.steps} steps" if settings.steps else f"{settings.stage_minutes:g} minutes"
    link = Path(os.path.relpath(figures / "continual.png", report.parent)).as_posix()
    lines = [
        begin,
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d')}.",
        "",
        f"Tasks in order: {', '.join(settings.order)}; {time_per_stage} of training per stage (joint: all stages' "
        "worth), "
        f"{settings.eval_examples} test examples per task, {settings.new_experts} new experts per added task, seed "
        f"{settings.seed}. Scores: accuracy by choice log-likelihood, entity F1 for ncbi_disease. ACC, BWT, FWT as "
        "defined in benchmarks/continual.py (GEM's; FWT only where a task can be scored before its stage).",
        "",
        *summary_rows(results, zero_shot, settings.order),
        "",
        "Zero-shot (base model): " + ", ".join(f"{t} {zero_shot[t]:.3f}" for t in settings.order if t in zero_shot),
        "",
        "Each learnable task right after its stage, against a fresh single-task run (paired bootstrap of the "
        "difference on the same test examples: ✓ above, ✗ below, · within noise):",
        "",
        *single_rows(results, singles, settings.order),
        "",
        *[line for variant, stages in results.items() for line in matrix_table(variant, stages, settings.order)],
        f"![continual accuracy matrices]({link})",
        end,
    ]
    text = "\n".join(lines)
    write_between_markers(report, text, begin, end, title="# Continual learning")
    return text


# ---- main ------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--stage-minutes", type=float, default=5.0, help="training time per stage")
    parser.add_argument("--eval-examples", type=int, default=100, help="test examples per task")
    parser.add_argument("--check-examples", type=int, default=10, help="probe size of an old task (routed chains)")
    parser.add_argument("--new-experts", type=int, default=4, help="LoRA experts per layer for each added task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help=f"a pipeline check: {QUICK}")
    parser.add_argument("--out", type=Path, default=None, help="run folders (default: runs/continual[-quick])")
    parser.add_argument("--results", type=Path, default=None, help="report file (default: docs/RESULTS.md)")
    parser.add_argument("--figures", type=Path, default=None, help="figure folder (default: docs/figures)")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds; no stage starts after it")
    parser.add_argument("--tasks", default=",".join(ORDER), help="the tasks in the order they arrive")
    parser.add_argument("--single", default=",".join(LEARNABLE), help="tasks that also get a single-task run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every recipe")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    if unknown := [v for v in variants if v not in VARIANTS]:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    quick = QUICK if args.quick else {}
    settings = Settings(
        args.stage_minutes,
        quick.get("steps"),
        quick.get("eval_examples", args.eval_examples),
        quick.get("check_examples", args.check_examples),
        args.new_experts,
        args.seed,
        tuple(args.tasks.split(",")),
        tuple(t for t in args.single.split(",") if t),
        tuple(args.set),
    )
    order = settings.order
    if unknown := [t for t in settings.single if t not in order]:
        parser.error(f"--single names tasks that are not in --tasks: {unknown}")
    out = args.out or ROOT / "runs" / ("continual-quick" if args.quick else "continual")
    results_file = args.results or (out / "continual.md" if args.quick else ROOT / "docs" / "RESULTS.md")
    figures = args.figures or (out / "figures" if args.quick else ROOT / "docs" / "figures")
    out.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    durations: list[float] = []

    def fits() -> bool:  # a stage starts while one more (as long as the longest so far) fits the limit
        elapsed = time.monotonic() - started
        return args.time_limit is None or elapsed + max(durations, default=0) <= args.time_limit

    def run(name: str, recipe_of, run_dir: Path, tasks: list[str], new: str | None, previous: dict | None, probe: bool):
        """Train and score one stage unless it is done (its scores, or None when the time limit stops it)."""
        path = run_dir / "scores.json"
        if path.is_file() and json.loads(path.read_text()).get("settings") == scoring(settings):
            return json.loads(path.read_text()) | {"steps": trained_steps(run_dir)}
        if not fits():
            return None
        begun = time.monotonic()
        print(f"{name}: {train_stage(recipe_of(), run_dir)} ({begun - started:.0f} s so far)", flush=True)
        scores = score_stage(run_dir, tasks, new, previous, probe, settings)
        durations.append(time.monotonic() - begun)
        print(f"{name}: " + ", ".join(f"{t} {r['score']:.3f}" for t, r in scores["tasks"].items()), flush=True)
        return scores | {"steps": trained_steps(run_dir)}

    results: dict[str, list[dict]] = {}
    singles: dict[str, dict] = {}
    for variant in variants:
        stages: list[dict] = []
        count = 1 if variant == "joint" else len(order)
        for stage in range(1, count + 1):
            if variant == "joint":
                run_dir, recipe_of, tasks = out / "joint" / "all", lambda: joint_recipe(settings), list(order)
            else:
                run_dir = stage_dir(variant, stage, out, order)
                recipe_of = lambda v=variant, s=stage: stage_recipe(v, s, settings, out)  # noqa: E731
                ahead = 1 if variant == "sequential-lora" else 0  # the next task too, for FWT
                tasks = list(order[: stage + ahead])
            previous, new = stages[-1] if stages else None, order[stage - 1] if variant != "joint" else None
            scores = run(f"{variant} {stage}", recipe_of, run_dir, tasks, new, previous, variant in ROUTED)
            if scores is None:
                break
            stages.append(scores)
        results[variant] = stages
        if variant in ("new-experts", "own-experts"):
            for task in settings.single:
                recipe_of = lambda t=task: single_recipe(t, settings)  # noqa: E731
                scores = run(f"single {task}", recipe_of, out / "single" / task, [task], task, None, False)
                if scores is not None:
                    singles[task] = scores
    if args.time_limit is not None and not fits():
        print(f"time limit reached ({time.monotonic() - started:.0f} s): run the command again to go on", flush=True)

    zero_shot = {
        t: r["zero_shot"] for v in results.values() for s in v for t, r in s["tasks"].items() if "zero_shot" in r
    }
    command = shlex.join(["python", "benchmarks/continual.py", *argv])
    section = write_report(results, singles, zero_shot, settings, command, figures, results_file, out.name)
    print(section)
    return section


if __name__ == "__main__":
    main()
