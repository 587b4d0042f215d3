"""Serving many tenants (tasks) of one backbone: batched multi-tenant generation and an OpenAI-compatible server.

The HTTP server (`create_app`, `serve_run`) needs the `serve` extra (fastapi, uvicorn): pip install
'loramix[serve]'. The rest (Engine, TaskRows, ...) needs only the core dependencies.
"""

from loramix.extras import requires
from loramix.serve.decoding import Completion, GenerationRequest, Sequence, TokenLogprob
from loramix.serve.engine import Engine, RequestError
from loramix.serve.rows import TaskRowLinear, TaskRows
from loramix.serve.run import load_engine, serve_run
from loramix.serve.scheduler import Scheduler, Ticket

__all__ = [
    "Completion",
    "Engine",
    "GenerationRequest",
    "RequestError",
    "Scheduler",
    "Sequence",
    "TaskRowLinear",
    "TaskRows",
    "Ticket",
    "TokenLogprob",
    "create_app",
    "load_engine",
    "serve_run",
]


def __getattr__(name: str):
    """`create_app` is imported on first use: it needs fastapi, which the core install does not bring."""
    if name == "create_app":
        with requires("serve", "the HTTP server"):
            from loramix.serve.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
