"""Serving many tenants (tasks) of one backbone: batched multi-tenant generation and an OpenAI-compatible server.

Needs the `serve` extra (fastapi, uvicorn): pip install 'loramix[serve]'.
"""

from loramix.serve.app import create_app
from loramix.serve.batcher import Batcher, Ticket
from loramix.serve.decoding import Completion, GenerationRequest
from loramix.serve.engine import Engine, RequestError
from loramix.serve.rows import TaskRowLinear, TaskRows
from loramix.serve.run import load_engine, serve_run

__all__ = [
    "Batcher",
    "Completion",
    "Engine",
    "GenerationRequest",
    "RequestError",
    "TaskRowLinear",
    "TaskRows",
    "Ticket",
    "create_app",
    "load_engine",
    "serve_run",
]
