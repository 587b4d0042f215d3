"""Serving a run folder: `load_engine(run_dir)` and `serve_run(run_dir, host, port)` (`loramix serve`)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from torch import nn

from loramix.model import load
from loramix.models import DEFAULT_MODEL, QUANTIZATIONS, load_model
from loramix.serve.engine import Engine


def read_run(run_dir: str | Path) -> tuple[str, list[str], str | None, str | None]:
    """(base model name, task names, system prompt, quantization) from a run's recipe.yaml; the task id of a
    name is its position; the system prompt is None where the run kept the chat template's default, the
    quantization None for an unquantized base."""
    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: is {run_dir} a run folder written by `loramix train`?")
    recipe = yaml.safe_load(path.read_text()) or {}
    tasks = recipe.get("tasks") if isinstance(recipe, dict) else None
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"{path}: `tasks` must be a non-empty list of task names, got {tasks!r}")
    model = recipe.get("model") or DEFAULT_MODEL
    if not isinstance(model, str):
        raise ValueError(f"{path}: `model` must be a model name or path, got {model!r}")
    system_prompt = recipe.get("system_prompt")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise ValueError(f"{path}: `system_prompt` must be text or null, got {system_prompt!r}")
    quantization = recipe.get("quantization")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"{path}: `quantization` must be one of {QUANTIZATIONS}, got {quantization!r}")
    return model, tasks, system_prompt, quantization


def load_adapter(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """The base model with a run's adapter: a peft adapter if adapter_config.json is there, else loramix's."""
    if (adapter_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(model, adapter_dir)
    return load(model, adapter_dir)


def load_engine(
    run_dir: str | Path,
    *,
    device: str | torch.device | None = None,
    max_new_tokens: int = 256,
    max_prompt_tokens: int | None = None,
    merged_tasks: int = 0,
) -> Engine:
    """An Engine for a run folder: its base model (float32, or quantized as it trained) with the adapter in
    adapter/, its recipe's tasks and system prompt."""
    run_dir = Path(run_dir)
    model_name, tasks, system_prompt, quantization = read_run(run_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(model_name, device=device, quantization=quantization)
    model = load_adapter(model, run_dir / "adapter")
    return Engine(
        model,
        tokenizer,
        tasks,
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        merged_tasks=merged_tasks,
        system_prompt=system_prompt,
    )


def serve_run(
    run_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    device: str | torch.device | None = None,
    max_batch_size: int = 16,
    batch_window_ms: float = 5.0,
    max_new_tokens: int = 256,
    max_prompt_tokens: int | None = None,
    merged_tasks: int = 0,
    log_level: str = "info",
) -> None:
    """Serve a run's tasks over the OpenAI-compatible HTTP API until interrupted (`model` = task name)."""
    import uvicorn  # the `serve` extra, like fastapi: only the HTTP server needs them

    from loramix.serve.app import create_app

    engine = load_engine(
        run_dir,
        device=device,
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        merged_tasks=merged_tasks,
    )
    app = create_app(engine, max_batch_size=max_batch_size, batch_window_ms=batch_window_ms)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
