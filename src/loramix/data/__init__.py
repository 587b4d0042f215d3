"""Tasks and their data: the six medical tasks, users' JSONL tasks and `data:` entries, and encoding for training."""

from loramix.data import medical  # noqa: F401  (registers the built-in tasks)
from loramix.data.base import SPLIT_SEED, TASKS, Example, Task, get_task, register_task
from loramix.data.encode import collate, encode_example
from loramix.data.jsonl import load_jsonl_task, load_jsonl_tasks
from loramix.data.paths import resolve_data_dir
from loramix.data.sources import load_data_tasks

__all__ = [
    "SPLIT_SEED",
    "TASKS",
    "Example",
    "Task",
    "collate",
    "encode_example",
    "get_task",
    "load_data_tasks",
    "load_jsonl_task",
    "load_jsonl_tasks",
    "register_task",
    "resolve_data_dir",
]
