"""Users' own tasks without code: JSONL rows of {"task", "prompt", "answer"} (+ optional "choices", "split"), and the
row checks and task building that the other formats of loramix.data.sources share."""

from __future__ import annotations

import json
from pathlib import Path

from loramix.data.base import TASKS, Example, Task, normalise, register_task
from loramix.data.splits import stratified_split

SPLITS = ("train", "validation", "test")
TEST_FRACTION = 0.2
MAX_NEW_TOKENS = 256  # the longest answer generated in evaluation (a long reference answer is cut there)


class JsonlTask(Task):
    """A task of users' rows (a JSONL file, or a recipe's `data:` entries), scored by accuracy: exact match after
    normalisation, and after parsing the generated text to the first choice it names when the rows give choices;
    free-text answers also by token F1. Rows without a split are split 80/20 (stratified by answer, seed 0)."""

    def __init__(self, name: str, path: Path, rows: list[tuple[Example, str | None]]) -> None:
        self.name, self.path, self.rows = name, path, rows
        choices = dict.fromkeys(c for example, _ in rows for c in example.choices or ())
        self.choices = tuple(choices) or None
        self.metrics = ("accuracy",) if self.choices else ("accuracy", "token_f1")
        self.trainable = any(split in ("train", None) for _, split in rows)
        self.max_new_tokens = min(MAX_NEW_TOKENS, max(8, *(4 + len(example.answer) // 2 for example, _ in rows)))

    def read(self, folder: Path) -> dict[str, list[Example]]:
        splits = {split: [e for e, s in self.rows if s == split] for split in SPLITS}
        train, test = stratified_split([e for e, s in self.rows if s is None], TEST_FRACTION)
        splits["train"] += train
        splits["test"] += test
        if not splits["validation"]:
            del splits["validation"]
        return splits

    def load(self, data_dir: str | Path | None = None) -> dict[str, list[Example]]:
        """The task's splits, from its own file (`data_dir` is not used)."""
        return self.read(self.path.parent)


def row_example(
    row: object, where: str, id: str, context: tuple[tuple[str, str], ...] = (), train_on: str = "all"
) -> tuple[Example, str | None]:
    """The example and split of one row {"task", "prompt", "answer"} (+ "choices", "split"); ValueError naming
    `where` (file:line, or a dataset's row) if malformed."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in ("task", "prompt", "answer"):
        if not isinstance(row.get(field), str) or not row[field].strip():
            raise ValueError(f"{where}: field {field!r} must be a non-empty string, got {row.get(field)!r}")
    choices = row.get("choices")
    if choices is not None:
        if not (isinstance(choices, list) and choices and all(isinstance(c, str) and c.strip() for c in choices)):
            raise ValueError(f"{where}: 'choices' must be a non-empty list of non-empty strings, got {choices!r}")
        if normalise(row["answer"]) not in {normalise(c) for c in choices}:
            raise ValueError(f"{where}: answer {row['answer']!r} is not one of the choices {choices}")
    split = row.get("split")
    if split is not None and split not in SPLITS:
        raise ValueError(f"{where}: 'split' must be one of {list(SPLITS)}, got {split!r}")
    choices = tuple(choices) if choices else None
    return Example(row["task"], row["prompt"], row["answer"], choices, id, context, train_on), split


def read_jsonl(path: Path):
    """(1-based line number, parsed value) of each non-blank line; ValueError naming file:line if not JSON."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None


def rows_tasks(rows: dict[str, list[tuple[Example, str | None]]], path: Path, register: bool) -> dict[str, JsonlTask]:
    """Tasks of rows read from `path` by task name (registered unless register=False); ValueError naming the
    file if there are none or a name is a built-in task's."""
    if not rows:
        raise ValueError(f"{path}: no examples (the file is empty)")
    for name in rows:
        if name in TASKS and not isinstance(TASKS[name], JsonlTask):
            raise ValueError(f"{path}: task name {name!r} is taken by a built-in task; rename it")
    tasks = {name: JsonlTask(name, path, examples) for name, examples in rows.items()}
    if register:
        for task in tasks.values():
            register_task(task)
    return tasks


def load_jsonl_tasks(path: str | Path, register: bool = True) -> dict[str, JsonlTask]:
    """The tasks of a JSONL file by name (registered unless register=False). Malformed rows, an empty file or a
    built-in task's name raise ValueError naming the file (and 1-based line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no task file at {path}")
    rows: dict[str, list[tuple[Example, str | None]]] = {}
    for number, row in read_jsonl(path):
        example, split = row_example(row, f"{path}:{number}", str(number))
        rows.setdefault(example.task, []).append((example, split))
    return rows_tasks(rows, path, register)


def load_jsonl_task(path: str | Path, register: bool = True) -> JsonlTask:
    """The one task of a JSONL file (see `load_jsonl_tasks`); ValueError if the file holds several."""
    tasks = load_jsonl_tasks(path, register=False)
    if len(tasks) > 1:
        raise ValueError(f"{path} holds several tasks ({', '.join(tasks)}); use load_jsonl_tasks")
    task = next(iter(tasks.values()))
    return register_task(task) if register else task
