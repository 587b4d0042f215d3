"""Model cards: the README.md of an adapter folder, with the Hugging Face Hub's metadata block (base model,
library, tags) and the base model, method, tasks and test scores in words and a table."""

from __future__ import annotations

from pathlib import Path

import yaml

from loramix.files import atomic_write_text
from loramix.models import DEFAULT_MODEL

CARD_NAME = "README.md"
MARK = "Trained with [loramix](https://pypi.org/project/loramix/)"  # how loramix recognises its own cards
PEFT_LORA = ("LoRA (peft)", "arXiv 2106.09685")
HUB_IDS = {DEFAULT_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}  # the default model ships as a GGUF file


def model_card(
    base_model: str | None,
    method: tuple[str, str],
    details: dict[str, str],
    *,
    library: str = "loramix",
    tasks: list[str] | None = None,
    scores: dict[str, dict[str, float]] | None = None,
) -> str:
    """A model card's text. `scores`: per task, metric -> test score (with optional "zero-shot" and "n")."""
    name, paper = method
    metadata = {"library_name": library, "pipeline_tag": "text-generation", "tags": ["loramix", "lora", "medical"]}
    if base_model:
        metadata["base_model"] = base_model
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False).strip(),
        "---",
        "",
        f"# {name} adapter for {base_model or 'a causal language model'}",
        "",
        f"{MARK}: {name} ({paper}).",
        "",
        *(f"- {key}: {value}" for key, value in details.items()),
    ]
    if tasks:
        lines += ["", f"Tasks: {', '.join(tasks)}."]
    if scores:
        lines += ["", "## Test scores", "", "| task | metric | score | zero-shot | n |", "|---|---|---:|---:|---:|"]
        for task, values in scores.items():
            metric = next(key for key in values if key not in ("zero-shot", "n"))
            zero_shot = values.get("zero-shot")
            shown = "—" if zero_shot is None else f"{zero_shot:.3f}"
            lines.append(f"| {task} | {metric} | {values[metric]:.3f} | {shown} | {values.get('n', '—')} |")
    loader = (
        "loramix.load(base_model, folder)"
        if library == "loramix"
        else "peft.PeftModel.from_pretrained(base_model, folder)"
    )
    lines += ["", f"Load it with `{loader}`.", ""]
    return "\n".join(lines)


def is_loramix_card(path: Path) -> bool:
    """Whether a README.md may be (over)written by loramix: it is missing or loramix wrote it."""
    return not path.is_file() or MARK in path.read_text(encoding="utf-8", errors="replace")


def write_card(directory: str | Path, text: str) -> Path:
    """Write `text` as the folder's README.md, atomically."""
    path = Path(directory) / CARD_NAME
    atomic_write_text(path, text)
    return path


def hub_id(model: str) -> str:
    """The Hub id of a recipe's `model` (the default model's name, a Hub id or a local path)."""
    return HUB_IDS.get(model, model)


def run_card(recipe, metrics: dict) -> str:
    """The card of a run's adapter folder: the recipe's base model, method and tasks, and the main metric of
    each task in `metrics` (metrics.json) with its zero-shot score."""
    if recipe.lora is not None:
        lora = recipe.lora
        method, library = PEFT_LORA, "peft"
        details = {"rank": str(lora.get("r")), "alpha": str(lora.get("lora_alpha"))}
        details["adapted modules"] = str(lora.get("target_modules"))
    else:
        (method, details), library = recipe.adapter_config().card_details(), "loramix"
    scores = run_card_scores(metrics)
    return model_card(hub_id(recipe.model), method, details, library=library, tasks=recipe.tasks, scores=scores)


def run_card_scores(metrics: dict) -> dict[str, dict]:
    """Per scored task of metrics.json: its main metric's test score, the zero-shot score and n."""
    scores = {}
    for task, result in metrics.get("tasks", {}).items():
        if result.get("model"):
            metric, value = next(iter(result["model"].items()))
            zero_shot = (result.get("zero_shot") or {}).get(metric)
            scores[task] = {metric: value, **({"zero-shot": zero_shot} if zero_shot is not None else {})}
            scores[task]["n"] = result.get("n")
    return scores
