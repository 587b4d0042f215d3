"""The `loramix` command: train, eval, inspect, export, compose, serve, lm-eval (a thin layer over the library)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from loramix.extras import MissingExtra, requires

app = typer.Typer(
    help="Mixture-of-LoRA-experts fine-tuning for Hugging Face causal LMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)


# Errors that mean a wrong input (bad recipe, missing data or run folder) or a missing extra: one line, no traceback
# (and for `loramix train`, a TrainingError).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, MissingExtra)


def _fail(error: Exception) -> typer.Exit:
    errors.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
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
    from loramix.train import TrainingError
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
    except (*USER_ERRORS, TrainingError) as error:
        raise _fail(error) from None
    except KeyboardInterrupt:
        errors.print(f"interrupted: continue with `loramix train --run {run} --resume`", markup=False)
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
    mode: Annotated[
        str | None, typer.Option(help="choices (log-likelihood of each label) or generate (default: the recipe's)")
    ] = None,
) -> None:
    """Score a run per task against zero-shot and the majority class; rewrite its report."""
    from loramix.evaluate import evaluate_and_report
    from loramix.recipe import load_recipe
    from loramix.run_folder import RunFolder

    try:
        folder = RunFolder(run)
        folder.require_adapter()
        extra = [f"data_dir={data_dir}"] if data_dir is not None else []
        recipe = load_recipe(folder.recipe_file, extra)
        evaluate_and_report(run, recipe, max_examples, zero_shot=zero_shot, mode=mode)
    except USER_ERRORS as error:
        raise _fail(error) from None
    _print_summary(run)


@app.command()
def inspect(run: Annotated[Path, typer.Argument(help="run folder")]) -> None:
    """Print a run's per-task scores (model, zero-shot, majority) and its training summary."""
    try:
        _print_summary(run)
    except FileNotFoundError as error:
        raise _fail(error) from None


@app.command()
def export(
    run: Annotated[Path, typer.Option(help="run folder of a `task`-router recipe")],
    task: Annotated[str, typer.Option(help="the task to export, e.g. pubmedqa")],
    out: Annotated[Path, typer.Option(help="folder for the peft adapter")],
) -> None:
    """Write one task of a `task`-router run as a standard peft LoRA adapter (exact, of the total rank)."""
    from loramix.export import export_run

    try:
        written = export_run(run, task, out)
    except USER_ERRORS as error:
        raise _fail(error) from None
    console.print(f"wrote the peft adapter of task {task} to {written}", highlight=False, markup=False)


@app.command()
def compose(
    upstream: Annotated[list[Path], typer.Option(help="a peft LoRA adapter folder; repeat for each adapter")],
    examples: Annotated[Path, typer.Option(help="JSONL file of {prompt, answer} rows of the new task")],
    out: Annotated[Path, typer.Option(help="folder for the composed adapter, its weights and search curve")],
    model: Annotated[str | None, typer.Option(help="base model (default: the one the adapters name)")] = None,
    budget: Annotated[int, typer.Option(help="loss evaluations of the gradient-free search")] = 40,
    l1: Annotated[float, typer.Option(help="weight of the mean |w| penalty")] = 0.05,
    seed: Annotated[int, typer.Option(help="seed of the search")] = 0,
) -> None:
    """LoRAHub: search weights for the upstream LoRAs that fit a few examples of a new task, without gradients."""
    from loramix.compose import compose_command

    try:
        result = compose_command(upstream, examples, out, model, budget, l1, seed)
    except USER_ERRORS as error:
        raise _fail(error) from None
    weights = ", ".join(f"{path.name} {weight:+.3f}" for path, weight in zip(upstream, result.weights, strict=True))
    console.print(f"weights: {weights}; loss {result.loss:.4f}; wrote {out}", highlight=False, markup=False)


@app.command()
def serve(
    run: Annotated[Path | None, typer.Option(help="run folder written by `loramix train`")] = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option(help="NAME=PATH: also serve a peft LoRA or loramix run folder as NAME (repeatable)"),
    ] = None,
    max_adapters: Annotated[
        int | None, typer.Option(help="adapters kept loaded; the least recently used are reloaded on demand")
    ] = None,
    model: Annotated[str | None, typer.Option(help="base model when no --run is given (default: SmolLM2)")] = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    device: Annotated[str | None, typer.Option(help="torch device (default: cuda if available, else cpu)")] = None,
    max_batch_size: Annotated[int, typer.Option(help="most requests decoding together (the others wait)")] = 16,
    max_new_tokens: Annotated[int, typer.Option(help="largest max_tokens a request may ask for")] = 256,
    max_prompt_tokens: Annotated[
        int | None, typer.Option(help="longest prompt accepted (default: the model's context)")
    ] = None,
    merged_tasks: Annotated[int, typer.Option(help="`task` router: merged task updates kept cached")] = 0,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or float64 (unquantized bases)")] = "float32",
    api_key: Annotated[
        str | None,
        typer.Option(envvar="LORAMIX_API_KEY", help="require `Authorization: Bearer KEY` on every /v1 route"),
    ] = None,
    drain_timeout: Annotated[
        float, typer.Option(help="seconds that running requests get to finish after SIGTERM or Ctrl-C")
    ] = 60.0,
) -> None:
    """Serve a run's tasks and adapters by name over an OpenAI-compatible HTTP API until interrupted.

    `model` is a task of the run, an adapter's NAME or NAME/TASK. Requests join the running batch at the next
    decoding step (continuous batching). GET /metrics gives Prometheus metrics. SIGTERM drains: running requests
    finish, new ones get 503, then the server exits."""
    from loramix.serve import serve_run

    try:
        adapters = dict(_name_and_path(item) for item in adapter or [])
        serve_run(
            run,
            host,
            port,
            device=device,
            max_batch_size=max_batch_size,
            max_new_tokens=max_new_tokens,
            max_prompt_tokens=max_prompt_tokens,
            merged_tasks=merged_tasks,
            dtype=dtype,
            adapters=adapters,
            max_adapters=max_adapters,
            model=model,
            api_key=api_key,
            drain_timeout_s=drain_timeout,
        )
    except USER_ERRORS as error:
        raise _fail(error) from None


def _name_and_path(item: str) -> tuple[str, str]:
    name, separator, path = item.partition("=")
    if not separator or not name or not path:
        raise ValueError(f"--adapter {item!r}: expected NAME=PATH")
    return name, path


SUMMARY_WIDTH = 130  # the score table's width even in a narrower terminal: intervals need the room


@app.command(
    "lm-eval",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def lm_eval(ctx: typer.Context) -> None:
    """lm-evaluation-harness, with loramix runs as a model: --model loramix --model_args run=RUN[,task=TASK].

    Every argument is the harness's (`loramix lm-eval --help` prints its help); needs `pip install
    'loramix[harness]'`.
    """
    import sys

    try:
        with requires("harness", "loramix lm-eval"):
            from lm_eval.__main__ import cli_evaluate

            import loramix.harness  # noqa: F401  (registers the "loramix" model)
    except MissingExtra as error:
        raise _fail(error) from None
    sys.argv = ["lm_eval", *ctx.args]
    cli_evaluate()


def _print_summary(run: Path) -> None:
    import json

    from loramix.report import summary_table

    Console(width=max(console.width, SUMMARY_WIDTH)).print(summary_table(run))
    training = run / "training.json"
    if training.is_file():
        summary = json.loads(training.read_text())
        truncated = ", ".join(f"{t} {n}/{summary['encoded'][t]}" for t, n in summary["truncated"].items())
        console.print(
            f"trained {summary['steps']} steps in {summary['seconds'] / 60:.1f} min; "
            f"inputs truncated to {summary['max_length']} tokens: {truncated}",
            highlight=False,
            markup=False,
        )


if __name__ == "__main__":
    app()
