"""Serving a run folder: `load_engine(run_dir)` and `serve_run(run_dir, host, port)` (`loramix serve`)."""

from __future__ import annotations

from pathlib import Path

import torch

from loramix.extras import requires
from loramix.models import DEFAULT_MODEL, load_model
from loramix.run_folder import RunFolder
from loramix.serve.adapters import AdapterSet
from loramix.serve.engine import Engine, RequestError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def load_engine(
    run_dir: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    max_new_tokens: int = 256,
    max_prompt_tokens: int | None = None,
    merged_tasks: int = 0,
    dtype: str = "float32",
    adapters: dict[str, str | Path] | None = None,
    max_adapters: int | None = None,
    model: str | None = None,
) -> Engine:
    """An Engine for a run folder: its base model (in `dtype`, or quantized as it trained) with the adapter in
    adapter/ (in the same dtype), its recipe's tasks and system prompt; and `adapters` (name -> folder: peft LoRA or
    loramix run folders) served by name beside it, at most `max_adapters` resident. Without a run folder the base
    model is `model` (default: the default model) and only the adapters are served."""
    if run_dir is None and not adapters:
        raise ValueError("serve a run folder (--run), adapters by name (--adapter NAME=PATH), or both")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid; allowed: {sorted(DTYPES)}")
    run = RunFolder(run_dir) if run_dir is not None else None
    tasks, system_prompt, quantization = [], None, None
    if run is not None:
        saved = run.saved_recipe()
        model, tasks, system_prompt, quantization = saved.model, saved.tasks, saved.system_prompt, saved.quantization
    model = model or DEFAULT_MODEL
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    base, tokenizer = load_model(model, device=device, quantization=quantization, dtype=DTYPES[dtype])
    adapter_set = None
    if adapters or max_adapters is not None:
        if quantization is not None:
            raise ValueError("adapters by name need an unquantized base model; this run's base is quantized")
        adapter_set = AdapterSet(base, model, max_adapters)
    served = run.load_adapter(base) if run is not None else base
    if quantization is None:
        served = served.to(DTYPES[dtype])
    engine = Engine(
        served,
        tokenizer,
        tasks,
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        merged_tasks=merged_tasks,
        system_prompt=system_prompt,
        adapters=adapter_set,
    )
    for name, path in (adapters or {}).items():
        try:
            engine.load_adapter(name, path)
        except RequestError as error:
            raise ValueError(error.message) from None
    return engine


def serve_run(
    run_dir: str | Path | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    device: str | torch.device | None = None,
    max_batch_size: int = 16,
    max_new_tokens: int = 256,
    max_prompt_tokens: int | None = None,
    merged_tasks: int = 0,
    dtype: str = "float32",
    adapters: dict[str, str | Path] | None = None,
    max_adapters: int | None = None,
    model: str | None = None,
    api_key: str | None = None,
    drain_timeout_s: float = 60.0,
    log_level: str = "info",
) -> None:
    """Serve a run's tasks over the OpenAI-compatible HTTP API until interrupted (`model` = task name).

    SIGTERM or Ctrl-C drains: the server stops listening, refuses requests on open connections (503), lets the
    running ones finish (at most `drain_timeout_s`) and exits."""
    with requires("serve", "the HTTP server"):  # fastapi and uvicorn: only the HTTP server needs them
        import uvicorn

        from loramix.serve.app import create_app

    engine = load_engine(
        run_dir,
        device=device,
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        merged_tasks=merged_tasks,
        dtype=dtype,
        adapters=adapters,
        max_adapters=max_adapters,
        model=model,
    )
    app = create_app(engine, max_batch_size=max_batch_size, api_key=api_key)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.scheduler.close()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout_s)
    DrainingServer(config).run()
