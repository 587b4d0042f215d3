"""The `loramix` command: train, eval, inspect, export, compose, serve."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="Mixture-of-LoRA-experts fine-tuning for Hugging Face causal LMs.", no_args_is_help=True)
console = Console()
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, RuntimeError)


def _fail(error: Exception) -> None:
    console.print(f"[bold red]error:[/] {error}")
    raise typer.Exit(code=2)


@app.command()
def train(
    config: Annotated[Path, typer.Option("--config", "-c", help="recipe YAML, e.g. configs/remix.yaml")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. training.steps=50")] = None,
    run: Annotated[Path | None, typer.Option(help="run folder (default: runs/<recipe name>)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run's last checkpoint")] = False,
    data_dir: Annotated[Path | None, typer.Option(help="medical data folder (default: ../shared/data/medical)")] = None,
    evaluate: Annotated[bool, typer.Option(help="evaluate and write the report at the end")] = True,
) -> None:
    """Train a recipe, evaluate it on the test splits and write the report."""
    from loramix.recipe import load_recipe
    from loramix.train import train as run_training

    try:
        overrides = list(overrides or [])
        if data_dir is not None:
            overrides.append(f"data_dir={data_dir}")
        recipe = load_recipe(config, overrides)
        run_dir = run_training(recipe, run or Path("runs") / recipe.name, resume=resume, evaluate=evaluate)
    except USER_ERRORS as error:
        _fail(error)
    if evaluate:
        _print_summary(run_dir)


@app.command("eval")
def evaluate(
    run: Annotated[Path, typer.Option(help="run folder written by `loramix train`")],
    max_examples: Annotated[int | None, typer.Option(help="test examples per task (default: the recipe's)")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="medical data folder")] = None,
    zero_shot: Annotated[bool, typer.Option(help="also score the base model zero-shot")] = True,
) -> None:
    """Score a run per task against zero-shot and the majority class; rewrite its report."""
    from loramix.evaluate import evaluate_run
    from loramix.recipe import load_recipe
    from loramix.report import write_report

    try:
        recipe = load_recipe(run / "recipe.yaml")
        limit = max_examples if max_examples is not None else recipe.eval_examples
        evaluate_run(run, data_dir=data_dir or recipe.data_dir, max_examples=limit, zero_shot=zero_shot)
        write_report(run)
    except USER_ERRORS as error:
        _fail(error)
    _print_summary(run)


@app.command()
def inspect(run: Annotated[Path, typer.Argument(help="run folder")]) -> None:
    """Print a run's per-task summary table."""
    if not (run / "metrics.json").is_file():
        _fail(FileNotFoundError(f"{run / 'metrics.json'} is missing: run `loramix eval --run {run}` first"))
    _print_summary(run)


def _print_summary(run_dir: Path) -> None:
    from loramix.report import summary_table

    console.print(summary_table(run_dir))


if __name__ == "__main__":
    app()
