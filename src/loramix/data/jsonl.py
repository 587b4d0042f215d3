"""Users' own tasks without code: JSONL rows of {"task", "prompt", "answer"} (+ optional "choices", "split")."""

from __future__ import annotations

import json
from pathlib import Path

from loramix.data.base import Example, Task, register_task, stratified_split

SPLITS = ("train", "validation", "test")


class JsonlTask(Task):
    """A task read from a JSONL file; scored by exact match (after parsing to a choice, if choices are given)."""

    def __init__(self, name: str, path: Path, examples: list[tuple[Example, str | None]]) -> None:
        self.name, self.path = name, path
        self.examples = examples
        choices = next((e.choices for e, _ in examples if e.choices), None)
        self.choices = choices
        self.max_new_tokens = max(16, *(len(e.answer.split()) * 2 for e, _ in examples))

    def read(self, folder: Path) -> dict[str, list[Example]]:
        given = {split: [e for e, s in self.examples if s == split] for split in SPLITS}
        unassigned = [e for e, s in self.examples if s is None]
        if unassigned:
            train, test = stratified_split(unassigned, 0.2)
            given["train"] += train
            given["test"] += test
        return {split: examples for split, examples in given.items() if examples}

    def load(self, data_dir: str | Path | None = None) -> dict[str, list[Example]]:
        return self.read(self.path.parent)


def load_jsonl_tasks(path: str | Path, register: bool = True) -> dict[str, JsonlTask]:
    """The tasks of a JSONL file, by name; malformed rows raise ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no task file at {path}")
    rows: dict[str, list[tuple[Example, str | None]]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for field in ("task", "prompt", "answer"):
            if not isinstance(row.get(field), str) or not row[field].strip():
                raise ValueError(f"{where}: field {field!r} must be a non-empty string, got {row.get(field)!r}")
        choices = row.get("choices")
        if choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
            raise ValueError(f"{where}: 'choices' must be a list of strings, got {choices!r}")
        split = row.get("split")
        if split is not None and split not in SPLITS:
            raise ValueError(f"{where}: 'split' must be one of {list(SPLITS)}, got {split!r}")
        example = Example(row["task"], row["prompt"], row["answer"], tuple(choices) if choices else None, str(number))
        rows.setdefault(row["task"], []).append((example, split))
    if not rows:
        raise ValueError(f"{path}: no examples (the file is empty)")
    tasks = {name: JsonlTask(name, path, examples) for name, examples in rows.items()}
    if register:
        for task in tasks.values():
            register_task(task)
    return tasks
