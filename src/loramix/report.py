"""The report of a run: plots of training and routing, and the per-task score table (report.md)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import yaml  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402
from safetensors import safe_open  # noqa: E402

from loramix.files import read_json  # noqa: E402

COLUMNS = ("model", "zero_shot", "majority")
LABELS = {"model": "model", "zero_shot": "zero-shot", "majority": "majority"}
COLOURS = {"model": "#1f77b4", "zero_shot": "#ff7f0e", "majority": "#9e9e9e"}
DIFFERENCE_LABELS = {"zero_shot": "model − zero-shot", "majority": "model − majority"}
DENSE_ROUTERS = ("soft", "task")  # every expert is active: top_k means nothing for them
MAX_HEATMAP_ROWS = 40
MAX_CURVE_ROWS = 12  # steps the learning-curve table shows (evenly spread, the first and the last among them)


# ---- reading the run folder ---------------------------------------------------------------------------------
def _read_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_history(run_dir: Path) -> list[dict]:
    """The logged training steps of history.jsonl (empty if there is none)."""
    return _read_lines(run_dir / "history.jsonl")


def read_learning_curve(run_dir: Path) -> list[dict]:
    """The dev evaluations of learning_curve.jsonl (empty if there is none)."""
    return _read_lines(run_dir / "learning_curve.jsonl")


def _adapter_config(run_dir: Path) -> dict:
    """The loramix adapter settings (router, top_k, num_experts), or {} for a peft adapter."""
    return read_json(run_dir / "adapter" / "loramix_config.json", default={})


def read_rank_allocation(run_dir: Path) -> dict[str, int]:
    """An ALoRA adapter's active ranks per module (module name -> ranks), from its saved gates; {} otherwise."""
    path = run_dir / "adapter" / "adapter.safetensors"
    if _adapter_config(run_dir).get("method") != "alora" or not path.is_file():
        return {}
    with safe_open(path, framework="pt") as tensors:
        suffix = ".rank_gates"
        return {
            key.removeprefix("base_model.").removesuffix(suffix): int(tensors.get_tensor(key).count_nonzero())
            for key in tensors.keys()  # noqa: SIM118  (a safetensors file is not iterable)
            if key.endswith(suffix)
        }


# ---- the score table ----------------------------------------------------------------------------------------
def score_rows(metrics: dict) -> list[tuple[str, str, dict[str, float | None]]]:
    """(task, metric, {column: value}) for every task's metrics and a final average row.

    A task's first metric is its main one. The average row averages the main metrics over the same tasks
    in every column: those scored in each column that has any score (e.g. not a task the model skipped).
    """
    rows, main = [], {}
    for task, result in metrics.get("tasks", {}).items():
        names = list(dict.fromkeys(name for column in COLUMNS for name in (result.get(column) or {})))
        for name in names:
            rows.append((task, name, {column: (result.get(column) or {}).get(name) for column in COLUMNS}))
        if names:
            main[task] = rows[-len(names)][2]
    filled = [column for column in COLUMNS if any(values[column] is not None for values in main.values())]
    common = [values for values in main.values() if all(values[column] is not None for column in filled)]
    if common:
        average = {c: sum(v[c] for v in common) / len(common) if c in filled else None for c in COLUMNS}
        label = "main metric" if len(common) == len(main) else f"main metric, {len(common)} of {len(main)} tasks"
        rows.append(("average", label, average))
    return rows


def _format(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _with_interval(result: dict, column: str, metric: str, value: float | None, separator: str = " ") -> str:
    """ "0.617 [0.550, 0.680]": the value and its 95% interval, where metrics.json has one."""
    interval = ((result.get("intervals") or {}).get(column) or {}).get(metric)
    if value is None or interval is None:
        return _format(value)
    return f"{value:.3f}{separator}[{interval[0]:.3f}, {interval[1]:.3f}]"


def _difference(result: dict, column: str, metric: str, separator: str = " ") -> str:
    """ "+0.120 [+0.050, +0.190] ✓": the model's paired difference from a baseline on the task's main metric
    (✓: the interval's low end is above zero, the model beats it; ✗ otherwise)."""
    difference = (result.get("differences") or {}).get(column)
    if not difference or difference["metric"] != metric:
        return ""
    mark = "✓" if difference["beats"] else "✗"
    return f"{difference['difference']:+.3f}{separator}[{difference['low']:+.3f}, {difference['high']:+.3f}] {mark}"


def summary_table(run_dir: str | Path) -> Table:
    """A rich table of the run's per-task metrics (model, zero-shot, majority, with 95% intervals), the model's
    paired differences from both baselines, and an average row."""
    run_dir = Path(run_dir)
    metrics = read_json(run_dir / "metrics.json", default={})
    if not metrics:
        raise FileNotFoundError(f"{run_dir / 'metrics.json'} is missing: run `loramix eval --run {run_dir}` first")
    # names are the user's: escaped, so that rich prints a bracketed part instead of reading it as markup
    table = Table(
        title=f"{escape(run_dir.name)}: test scores [95% interval]; ✓ = beats the baseline (paired bootstrap)"
    )
    table.add_column("task")
    table.add_column("metric")
    for column in COLUMNS:
        table.add_column(LABELS[column], justify="right")
    for label in DIFFERENCE_LABELS.values():
        table.add_column(label, justify="right")
    table.add_column("n", justify="right")
    previous = None
    rows = score_rows(metrics)
    for index, (task, name, values) in enumerate(rows):
        last = index == len(rows) - 1
        result = metrics["tasks"].get(task, {})
        n = "" if last or task == previous else str(result.get("n", ""))
        table.add_row(
            "" if task == previous else escape(task),
            name,
            *(_with_interval(result, column, name, values[column], "\n") for column in COLUMNS),
            *(_difference(result, column, name, "\n") for column in DIFFERENCE_LABELS),
            n,
            end_section=not last and rows[index + 1][0] != task,
            style="bold" if last else None,
        )
        previous = task
    return table


def _markdown_table(metrics: dict) -> str:
    header = ["task", "metric", "model", "zero-shot", "majority", *DIFFERENCE_LABELS.values(), "n"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for task, name, values in score_rows(metrics):
        result = metrics["tasks"].get(task, {})
        cells = [
            task,
            name,
            *(_with_interval(result, column, name, values[column]) for column in COLUMNS),
            *(_difference(result, column, name) for column in DIFFERENCE_LABELS),
            str(result.get("n", "")),
        ]
        if task == "average":
            cells = [f"**{cell}**" if cell else "" for cell in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- plots --------------------------------------------------------------------------------------------------
def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average."""
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out


def _save(figure: plt.Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_loss(history: list[dict], path: Path) -> Path | None:
    """Training loss and cross-entropy, and the auxiliary losses beside them."""
    logged = [h for h in history if "loss" in h]
    if not logged:
        return None
    steps = [h["step"] for h in logged]
    aux_names = sorted({name for h in logged for name in h.get("aux") or {}})
    figure, axes = plt.subplots(1, 2 if aux_names else 1, figsize=(11 if aux_names else 6.5, 4), squeeze=False)
    axis = axes[0][0]
    window = max(1, len(logged) // 20)
    for key, colour in (("loss", "#1f77b4"), ("ce", "#d62728")):
        values = [h.get(key) for h in logged]
        if any(v is None for v in values) or (key == "ce" and values == [h["loss"] for h in logged]):
            continue
        axis.plot(steps, values, color=colour, alpha=0.3 if window > 1 else 1.0, linewidth=1)
        if window > 1:
            axis.plot(steps, _smooth(values, window), color=colour, linewidth=2, label=f"{key} (mean of {window})")
        else:
            axis.plot([], [], color=colour, label=key)
    axis.set(xlabel="step", ylabel="loss", title="training loss")
    axis.legend()
    axis.grid(alpha=0.3)
    if aux_names:
        axis = axes[0][1]
        for name in aux_names:
            points = [(h["step"], h["aux"][name]) for h in logged if name in (h.get("aux") or {})]
            axis.plot(*zip(*points, strict=True), label=name, linewidth=1.5)
        axis.set(xlabel="step", ylabel="value (before weighting)", title="auxiliary losses")
        axis.legend()
        axis.grid(alpha=0.3)
    return _save(figure, path)


def curve_series(curve: list[dict]) -> dict[str, tuple[str, list[tuple[int, float]]]]:
    """Per task of the learning curve: (its main metric, the first one it reports; [(step, value)])."""
    series: dict[str, tuple[str, list[tuple[int, float]]]] = {}
    for point in curve:
        for task, metrics in point["tasks"].items():
            if metrics:
                metric, points = series.setdefault(task, (next(iter(metrics)), []))
                points.append((point["step"], metrics[metric]))
    return series


def plot_learning_curve(curve: list[dict], path: Path) -> Path | None:
    """Each task's main metric on its dev examples against the training step."""
    series = curve_series(curve)
    if not series:
        return None
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for task, (metric, points) in series.items():
        axis.plot(*zip(*points, strict=True), marker="o", markersize=3, linewidth=1.5, label=f"{task} ({metric})")
    axis.set(xlabel="step", ylabel="dev score (main metric)", title="learning curve on the held-out dev examples")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    return _save(figure, path)


def _layer_and_kind(module: str) -> tuple[str, str]:
    """'model.layers.3.self_attn.q_proj' -> ('3', 'q_proj'); names without a number -> ('', name)."""
    match = re.search(r"\.(\d+)\.(?:.*\.)?([^.]+)$", module)
    return (match.group(1), match.group(2)) if match else ("", module)


Rows = list[tuple[str, list[float]]]


def _mean_sorted_rows(groups: dict[str, list[list[float]]]) -> Rows:
    """Per group, the mean over its modules of the loads sorted from the busiest expert down (expert i of
    one module has nothing to do with expert i of another, but how concentrated the load is compares)."""
    rows = []
    for label, loads in groups.items():
        ranked = [sorted(load, reverse=True) for load in loads]
        rows.append((label, [sum(column) / len(column) for column in zip(*ranked, strict=True)]))
    return rows


def _load_panels(routing: dict[str, dict]) -> list[tuple[str, Rows, str]]:
    """Heatmap panels (title, (label, load) rows, x label): one row per module, modules sharing a router (equal loads)
    merged; when that leaves too many rows to read, sorted loads averaged per decoder layer and per kind."""
    merged: list[tuple[list[str], list[float]]] = []
    for module, stats in routing.items():
        load = list(stats["load"])
        if merged and merged[-1][1] == load:
            merged[-1][0].append(module)
        else:
            merged.append(([module], load))
    rows = []
    for modules, load in merged:
        layers = {_layer_and_kind(m)[0] for m in modules}
        if len(modules) == 1:
            layer, kind = _layer_and_kind(modules[0])
            label = f"{layer}.{kind}" if layer else kind
        else:
            label = f"layer {layers.pop()}" if len(layers) == 1 else f"{len(modules)} modules (shared router)"
        rows.append((label, load))
    if len(rows) <= MAX_HEATMAP_ROWS:
        return [("per module", rows, "expert")]
    by_layer: dict[str, list[list[float]]] = {}
    by_kind: dict[str, list[list[float]]] = {}
    for module, stats in routing.items():
        layer, kind = _layer_and_kind(module)
        by_layer.setdefault(f"layer {layer}", []).append(stats["load"])
        by_kind.setdefault(kind, []).append(stats["load"])
    label = "experts sorted by load, busiest first"
    return [
        ("mean per decoder layer", _mean_sorted_rows(by_layer), label),
        ("mean per module kind", _mean_sorted_rows(by_kind), label),
    ]


def plot_expert_load(routing: dict[str, dict], path: Path, top_k: int | None = None) -> Path | None:
    """Heatmap of each adapted module's (or layer's) share of routed tokens per expert at the end of training."""
    figure = expert_load_figure(routing, top_k)
    return None if figure is None else _save(figure, path)


def expert_load_figure(routing: dict[str, dict], top_k: int | None = None, when: str = "at the end of training"):
    """The figure of `plot_expert_load` (None without routing), `when` in its title."""
    panels = [panel for panel in _load_panels(routing) if panel[1]]
    if not panels:
        return None
    width = max(len(load) for _, rows, _ in panels for _, load in rows)
    grids = [[load + [math.nan] * (width - len(load)) for _, load in rows] for _, rows, _ in panels]
    highest = max(v for grid in grids for row in grid for v in row if not math.isnan(v))
    sizes = [len(rows) for _, rows, _ in panels]
    figure, axes = plt.subplots(
        len(panels),
        1,
        figsize=(max(5.5, 3.0 + 0.55 * width), min(2.0 + 0.22 * sum(sizes) + 0.6 * len(panels), 18.0)),
        height_ratios=[size + 1.5 for size in sizes],
        squeeze=False,
    )
    for axis, (title, rows, xlabel), grid in zip(axes[:, 0], panels, grids, strict=True):
        image = axis.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=highest, interpolation="nearest")
        axis.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8 if len(rows) > 20 else 9)
        axis.set_xticks(range(width), [str(i) for i in range(width)])
        axis.set_title(title, fontsize=9)
        axis.set_xlabel(xlabel, fontsize=9)
        if len(rows) * width <= 160:
            for r, load in enumerate(grid):
                for c, value in enumerate(load):
                    if not math.isnan(value):
                        colour = "black" if value > 0.6 * highest else "white"
                        axis.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
        figure.colorbar(image, ax=axis, label="share of routed tokens")
    reference = f"uniform = {1 / width:.2f}" + (f", k = {top_k}" if top_k else "")
    figure.suptitle(f"expert load {when} ({reference})")
    figure.tight_layout()
    return figure


def plot_ess(history: list[dict], path: Path, top_k: int | None = None, num_experts: int | None = None) -> Path | None:
    """Mean effective support size over training, with the range over layers, and k for reference."""
    logged = [h for h in history if h.get("ess") is not None]
    if not logged:
        return None
    steps = [h["step"] for h in logged]
    figure, axis = plt.subplots(figsize=(6.5, 4))
    per_layer = [list((h.get("ess_per_layer") or {}).values()) for h in logged]
    if all(per_layer):
        axis.fill_between(
            steps, [min(v) for v in per_layer], [max(v) for v in per_layer], alpha=0.2, label="range over layers"
        )
    axis.plot(steps, [h["ess"] for h in logged], linewidth=2, label="mean over layers")
    if top_k:
        axis.axhline(top_k, linestyle="--", color="black", linewidth=1, label=f"k = {top_k}")
    if num_experts and not top_k:
        axis.axhline(num_experts, linestyle=":", color="grey", linewidth=1, label=f"n = {num_experts} (uniform)")
    axis.set(xlabel="step", ylabel="ESS = (Σw)² / Σw²", title="effective support size of the routing weights")
    axis.set_ylim(bottom=0)
    axis.legend()
    axis.grid(alpha=0.3)
    return _save(figure, path)


def plot_rank_allocation(ranks: dict[str, int], path: Path, start_rank: int | None = None) -> Path | None:
    """Heatmap of the active ranks of each adapted module: decoder layers down, module kinds across."""
    if not ranks:
        return None
    cells = {_layer_and_kind(module): count for module, count in ranks.items()}
    layers = sorted({layer for layer, _ in cells}, key=lambda layer: int(layer) if layer.isdigit() else -1)
    kinds = list(dict.fromkeys(kind for _, kind in cells))
    grid = [[cells.get((layer, kind), math.nan) for kind in kinds] for layer in layers]
    figure, axis = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), 1.5 + 0.32 * len(layers)))
    image = axis.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    axis.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right", fontsize=8)
    axis.set_yticks(range(len(layers)), [f"layer {layer}" if layer else "-" for layer in layers], fontsize=8)
    low, high = min(ranks.values()), max(ranks.values())
    for row, values in enumerate(grid):
        for column, value in enumerate(values):
            if not math.isnan(value):
                colour = "black" if value > (low + high) / 2 else "white"
                axis.text(column, row, str(int(value)), ha="center", va="center", fontsize=7, color=colour)
    figure.colorbar(image, ax=axis, label="active ranks")
    start = f", every module started at {start_rank}" if start_rank else ""
    axis.set_title(f"ranks allocated per module ({sum(ranks.values())} in all{start})", fontsize=9)
    return _save(figure, path)


def plot_scores(metrics: dict, path: Path) -> Path | None:
    """Per task, the main metric of the model, the zero-shot base model and the majority class."""
    rows = [(task, name, values) for task, name, values in score_rows(metrics)]
    main = [row for index, row in enumerate(rows) if index == 0 or row[0] != rows[index - 1][0]]
    if not main:
        return None
    figure, axis = plt.subplots(figsize=(max(6.0, 1.6 * len(main) + 1.5), 4.5))
    bar = 0.8 / len(COLUMNS)
    for offset, column in enumerate(COLUMNS):
        xs = [i + (offset - 1) * bar for i in range(len(main))]
        heights = [values[column] if values[column] is not None else 0.0 for _, _, values in main]
        bars = axis.bar(xs, heights, bar, label=LABELS[column], color=COLOURS[column])
        for rectangle, (_, _, values) in zip(bars, main, strict=True):
            text = "n/a" if values[column] is None else f"{values[column]:.2f}"
            axis.annotate(
                text,
                (rectangle.get_x() + bar / 2, rectangle.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
            )
    axis.set_xticks(range(len(main)), [f"{task}\n({name})" for task, name, _ in main], fontsize=8)
    axis.set(ylabel="score", title="test scores per task (main metric)")
    axis.set_ylim(0, 1.2 * max(1.0, *(v or 0 for _, _, values in main for v in values.values())))
    axis.legend(ncols=3, loc="upper center", fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    return _save(figure, path)


# ---- report.md ----------------------------------------------------------------------------------------------
def _setting(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_setting(v)}" for k, v in value.items() if v is not None)
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "—"
    return str(value)


def _recipe_section(recipe: dict) -> list[str]:
    return ["## Recipe", "", *(f"- **{key}**: {_setting(value)}" for key, value in recipe.items() if value is not None)]


def _training_section(history: list[dict], training: dict, top_k: int | None) -> list[str]:
    if not history and not training:
        return []
    lines = ["## Training", ""]
    if history:
        last = history[-1]
        lines.append(f"- steps: {last['step']}, final loss {last['loss']:.4f} (cross-entropy {last['ce']:.4f})")
        if last.get("ess") is not None:
            lines.append(f"- final mean ESS: {last['ess']:.2f}" + (f" (k = {top_k})" if top_k else ""))
    if training:
        lines.append(f"- time: {training['seconds'] / 60:.1f} min on {training.get('world_size', 1)} process(es)")
        truncated = training.get("truncated") or {}
        if truncated:
            encoded = training.get("encoded", {})
            counts = ", ".join(f"{task} {n}/{encoded.get(task, '?')}" for task, n in truncated.items())
            lines.append(f"- inputs truncated to {training.get('max_length')} tokens: {counts}")
        dropped = {task: n for task, n in (training.get("dropped_turns") or {}).items() if n}
        if dropped:
            turns = ", ".join(f"{task} {n}" for task, n in dropped.items())
            lines.append(f"- earliest conversation turns dropped to fit: {turns}")
    return lines


def _curve_section(curve: list[dict], plot: Path | None, dev_examples: int | None) -> list[str]:
    """The main metric of each task on its dev examples at some of the evaluated steps, and the plot."""
    series = curve_series(curve)
    if not series:
        return []
    steps = sorted({step for _, points in series.values() for step, _ in points})
    if len(steps) > MAX_CURVE_ROWS:
        steps = [steps[round(i * (len(steps) - 1) / (MAX_CURVE_ROWS - 1))] for i in range(MAX_CURVE_ROWS)]
    values = {task: dict(points) for task, (_, points) in series.items()}
    lines = [
        "## Learning curve",
        "",
        f"Main metric on {dev_examples or 'the'} dev examples per task, held out of training (step 0: before it).",
        "",
        "| step | " + " | ".join(f"{task} ({metric})" for task, (metric, _) in series.items()) + " |",
        "|---:|" + "---:|" * len(series),
    ]
    lines += [f"| {step} | " + " | ".join(_format(values[task].get(step)) for task in series) + " |" for step in steps]
    return lines + ([] if plot is None else ["", f"![Learning curve]({plot.name})"])


def _scores_section(metrics: dict | None, run_dir: Path) -> list[str]:
    if not metrics:
        return ["## Test scores", "", f"No metrics.json yet: run `loramix eval --run {run_dir}`."]
    meta = metrics.get("meta", {})
    lines = ["## Test scores", "", _markdown_table(metrics), ""]
    settings = {k: v for k, v in meta.items() if not isinstance(v, (dict, list)) and v is not None}
    if settings:
        lines.append(f"Evaluation settings: {_setting(settings)}.")
    lines += [f"- {note}" for note in meta.get("notes", [])]
    parameters = meta.get("parameters")
    if parameters:
        lines += ["", "## Parameters", "", *(f"- {k.replace('_', ' ')}: {v:,}" for k, v in parameters.items())]
    return lines


def write_report(run_dir: str | Path) -> Path:
    """Write loss.png, expert_load.png, ess.png, scores.png, ranks.png (ALoRA), learning_curve.png (those that
    have data) and report.md."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder at {run_dir}")
    history, curve = read_history(run_dir), read_learning_curve(run_dir)
    metrics = read_json(run_dir / "metrics.json", default={})
    routing = read_json(run_dir / "routing.json", default={})
    recipe_path = run_dir / "recipe.yaml"
    recipe = (yaml.safe_load(recipe_path.read_text()) or {}) if recipe_path.is_file() else {}
    adapter = _adapter_config(run_dir)
    top_k = adapter.get("top_k") if adapter.get("router") not in (None, *DENSE_ROUTERS) else None

    plots = {
        "Training loss": plot_loss(history, run_dir / "loss.png"),
        "Expert load": plot_expert_load(routing, run_dir / "expert_load.png", top_k) if routing else None,
        "Effective support size": plot_ess(history, run_dir / "ess.png", top_k, adapter.get("num_experts")),
        "Scores": plot_scores(metrics, run_dir / "scores.png") if metrics else None,
        "Ranks per module": plot_rank_allocation(
            read_rank_allocation(run_dir), run_dir / "ranks.png", adapter.get("rank")
        ),
    }
    curve_plot = plot_learning_curve(curve, run_dir / "learning_curve.png")
    sections = [
        [f"# Run `{recipe.get('name', run_dir.name)}`"],
        _recipe_section(recipe) if recipe else [],
        _training_section(history, read_json(run_dir / "training.json", default={}), top_k),
        _curve_section(curve, curve_plot, recipe.get("dev_examples")),
        _scores_section(metrics, run_dir),
        ["## Plots", "", *(f"![{title}]({path.name})" for title, path in plots.items() if path is not None)],
    ]
    if not routing and adapter.get("method", "mixlora") == "mixlora":  # other methods have no router
        sections[-1].append("\nNo expert-load plot: routing.json is missing (a plain LoRA has no router).")
    report = run_dir / "report.md"
    report.write_text("\n\n".join("\n".join(section) for section in sections if section) + "\n")
    return report
