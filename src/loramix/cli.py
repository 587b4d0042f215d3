"""The `loramix` command: train, eval, inspect (a thin layer over loramix.train, evaluate and report)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    help="Mixture-of-LoRA-experts fine-tuning for Hugging Face causal LMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that mean a wrong input (bad recipe, missing data or run folder): one line, no traceback."""
    from loramix.train import TrainingError

    return ValueError, FileNotFoundError, FileExistsError, TrainingError


def _fail(error: Exception) -> typer.Exit:
    errors.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


@app.command()
def train(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key=value overrides, e.g. training.steps=50 mixlora.top_k=1")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="recipe YAML, e.g. configs/remix.yaml")] = None,
    run: Annotated[Path | None, typer.Option(help="run folder (default: runs/<recipe name>)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run folder's last checkpoint")] = False,
    data_dir: Annotated[Path | None, typer.Option(help="medical data folder (default: ../shared/data/medical)")] = None,
    evaluate: Annotated[bool, typer.Option(help="evaluate and write the report at the end")] = True,
) -> None:
    """Train a recipe into a run folder, then evaluate it on the test splits and write the report.

    `loramix train --run runs/NAME --resume` continues a stopped run with the recipe saved in it.
    """
    from loramix.recipe import load_recipe
    from loramix.train import train as run_training

    try:
        if config is None:
            if not (resume and run is not None):
                raise ValueError("give a recipe with --config (or --run RUN --resume to continue a run)")
            config = run / "recipe.yaml"
        extra = [f"data_dir={data_dir}"] if data_dir is not None else []
        recipe = load_recipe(config, [*(overrides or []), *extra])
        run = run or Path("runs") / recipe.name
        run_training(recipe, run, resume=resume, evaluate=evaluate)
    except _user_errors() as error:
        raise _fail(error) from None
    except KeyboardInterrupt:
        errors.print(f"interrupted: continue with `loramix train --run {run} --resume`")
        raise typer.Exit(code=130) from None
    finally:
        _leave_process_group()
    if evaluate and int(os.environ.get("RANK", "0")) == 0:
        _print_summary(run)


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@app.command("eval")
def evaluate(
    run: Annotated[Path, typer.Option(help="run folder written by `loramix train`")],
    max_examples: Annotated[
        int | None, typer.Option(help="test examples per task (default: the recipe's eval_examples)")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="medical data folder")] = None,
    zero_shot: Annotated[bool, typer.Option(help="also score the base model zero-shot")] = True,
) -> None:
    """Score a run per task against zero-shot and the majority class; rewrite its report."""
    from loramix.recipe import load_recipe
    from loramix.train import evaluate_and_report

    try:
        if not (run / "adapter").is_dir():
            raise FileNotFoundError(f"{run / 'adapter'} is missing: is {run} a finished `loramix train` run?")
        extra = [f"data_dir={data_dir}"] if data_dir is not None else []
        recipe = load_recipe(run / "recipe.yaml", extra)
        evaluate_and_report(run, recipe, max_examples, zero_shot=zero_shot)
    except _user_errors() as error:
        raise _fail(error) from None
    _print_summary(run)


@app.command()
def inspect(run: Annotated[Path, typer.Argument(help="run folder")]) -> None:
    """Print a run's per-task scores (model, zero-shot, majority) and its training summary."""
    try:
        _print_summary(run)
    except FileNotFoundError as error:
        raise _fail(error) from None


def _print_summary(run: Path) -> None:
    import json

    from loramix.report import summary_table

    console.print(summary_table(run))
    training = run / "training.json"
    if training.is_file():
        summary = json.loads(training.read_text())
        truncated = ", ".join(f"{t} {n}/{summary['encoded'][t]}" for t, n in summary["truncated"].items())
        console.print(
            f"trained {summary['steps']} steps in {summary['seconds'] / 60:.1f} min; "
            f"inputs truncated to {summary['max_length']} tokens: {truncated}",
            highlight=False,
        )


if __name__ == "__main__":
    app()
