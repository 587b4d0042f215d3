"""Users' data as a recipe's `data:` entries: rows, chat conversations, Alpaca instructions or named columns, read
from JSONL files by loramix or from any `datasets` source that loads offline (parquet, CSV, JSON, a saved dataset)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from loramix.data.base import Example
from loramix.data.jsonl import JsonlTask, read_jsonl, row_example, rows_tasks

FORMATS = ("rows", "chat", "alpaca", "columns")
SOURCES = ("jsonl", "parquet", "csv", "json", "disk")  # jsonl: read by loramix (errors name the line)
SUFFIXES = {".jsonl": "jsonl", ".parquet": "parquet", ".csv": "csv", ".json": "json"}
TRAIN_ON = ("all", "last")
# each format's fields, which `columns:` may map to other column names (the required ones first)
FIELDS = {
    "rows": ("task", "prompt", "answer", "choices", "split"),
    "chat": ("messages", "choices", "split"),
    "alpaca": ("instruction", "output", "input", "system", "choices", "split"),
    "columns": ("prompt", "answer", "choices", "split"),
}
REQUIRED = {"rows": 3, "chat": 1, "alpaca": 2, "columns": 2}


class DataEntry(Protocol):
    """What loading needs of a recipe's `data:` entry (loramix.recipe.DataEntry)."""

    path: str
    format: str
    task: str | None
    columns: dict | None
    source: str | None
    split: str | None
    use_as: str | None
    train_on: str


def source_of(entry: DataEntry) -> str:
    """The entry's source: its `source`, else by the path's suffix (a folder: a dataset saved to disk)."""
    if entry.source is not None:
        return entry.source
    path = Path(entry.path)
    return "disk" if path.is_dir() else SUFFIXES.get(path.suffix.lower(), "")


def load_data_tasks(entries: list[DataEntry], register: bool = True) -> dict[str, JsonlTask]:
    """The tasks of a recipe's `data:` entries by name (entries naming the same task add to it), registered unless
    register=False. A malformed row raises ValueError naming its file and line (JSONL) or row index (datasets)."""
    rows: dict[str, list[tuple[Example, str | None]]] = {}
    origin: dict[str, Path] = {}
    for entry in entries:
        for example, split in entry_examples(entry):
            rows.setdefault(example.task, []).append((example, split))
            origin.setdefault(example.task, Path(entry.path))
    tasks: dict[str, JsonlTask] = {}
    for name, examples in rows.items():
        tasks |= rows_tasks({name: examples}, origin[name], register)
    return tasks


def entry_examples(entry: DataEntry) -> Iterator[tuple[Example, str | None]]:
    """(example, split) of every row of one entry, in the source's order; nothing is skipped. An example's id is
    the file's name and the row's line (JSONL) or index (datasets), as in "chat.jsonl:7"."""
    path, source = Path(entry.path), source_of(entry)
    if not path.exists():
        raise FileNotFoundError(f"no data at {path}")
    names = {field: field for field in FIELDS[entry.format]} | (entry.columns or {})
    count = 0
    raw = _jsonl_rows(path) if source == "jsonl" else _dataset_rows(entry, path, source, names)
    for where, index, row in raw:
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        values = {field: row.get(column) for field, column in names.items()}
        example, split = _FORMATS[entry.format](values, entry, where, f"{path.name}:{index}")
        if entry.use_as is not None:
            if split not in (None, entry.use_as):
                raise ValueError(f"{where}: the row's split {split!r} contradicts the entry's use_as: {entry.use_as}")
            split = entry.use_as
        count += 1
        yield example, split
    if not count:
        raise ValueError(f"{path}: no examples (the source is empty)")


def _jsonl_rows(path: Path) -> Iterator[tuple[str, str, object]]:
    for number, row in read_jsonl(path):
        yield f"{path}:{number}", str(number), row


def _dataset_rows(entry: DataEntry, path: Path, source: str, names: dict[str, str]) -> Iterator[tuple[str, str, dict]]:
    """The rows of a `datasets` source, each named by its 0-based index."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"reading {path} with `datasets` needs the data extra: pip install 'loramix[data]'") from None
    split = entry.split or "train"
    if source == "disk":
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{path} has no split {split!r}; its splits: {', '.join(loaded)}")
            loaded = loaded[split]
    else:
        loaded = datasets.load_dataset(source, data_files=str(path), split=split)
    required = [names[field] for field in FIELDS[entry.format][: REQUIRED[entry.format]]]
    missing = [column for column in required if column not in loaded.column_names]
    if missing:
        raise ValueError(
            f"{path}: no column {missing[0]!r} (format {entry.format} needs {required}; map others with `columns:`); "
            f"its columns: {loaded.column_names}"
        )
    for index, row in enumerate(loaded):
        yield f"{path} [{split}] row {index}", str(index), {key: _text(value) for key, value in row.items()}


def _text(value: object) -> object:
    """Numbers as text (CSV columns of numbers load as ints); lists item by item; anything else as it is."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return [_text(item) for item in value] if isinstance(value, list) else value


def _rows(values: dict, entry: DataEntry, where: str, index: str) -> tuple[Example, str | None]:
    return row_example(values, where, index)


def _columns(values: dict, entry: DataEntry, where: str, index: str) -> tuple[Example, str | None]:
    return row_example(values | {"task": entry.task}, where, index)


def _alpaca(values: dict, entry: DataEntry, where: str, index: str) -> tuple[Example, str | None]:
    """Alpaca's instruction, then a blank line and the input when there is one; the output is the answer; an
    optional system text is the row's system turn."""
    for field in ("instruction", "output"):
        if not isinstance(values[field], str) or not values[field].strip():
            raise ValueError(f"{where}: field {field!r} must be a non-empty string, got {values[field]!r}")
    for field in ("input", "system"):
        if values[field] is not None and not isinstance(values[field], str):
            raise ValueError(f"{where}: field {field!r} must be a string, got {values[field]!r}")
    instruction, extra, system = values["instruction"], values["input"], values["system"]
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    row = {"task": entry.task, "prompt": prompt, "answer": values["output"], **_optional(values)}
    return row_example(row, where, index, (("system", system),) if system else ())


def _chat(values: dict, entry: DataEntry, where: str, index: str) -> tuple[Example, str | None]:
    """OpenAI's chat rows: an optional system turn, then user and assistant turns in turn, the assistant's last."""
    messages = values["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of messages, got {messages!r}")
    system = int(isinstance(messages[0], dict) and messages[0].get("role") == "system")
    turns = []
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise ValueError(f"{where}: message {number} must be an object of 'role' and 'content', got {message!r}")
        role, content = message["role"], message["content"]
        expected = "system" if number < system else ("user", "assistant")[(number - system) % 2]
        if role != expected:
            raise ValueError(
                f"{where}: message {number} has role {role!r}, expected {expected!r} (an optional system turn, then "
                "user and assistant turns in turn, the assistant's last)"
            )
        if not isinstance(content, str) or (role != "system" and not content.strip()):
            raise ValueError(f"{where}: message {number} ({role}) must have non-empty text content, got {content!r}")
        turns.append((role, content))
    if turns[-1][0] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's (the answer), not the {turns[-1][0]}'s")
    row = {"task": entry.task, "prompt": turns[-2][1], "answer": turns[-1][1], **_optional(values)}
    return row_example(row, where, index, tuple(turns[:-2]), entry.train_on)


def _optional(values: dict) -> dict:
    return {field: values[field] for field in ("choices", "split") if values.get(field) is not None}


_FORMATS = {"rows": _rows, "chat": _chat, "alpaca": _alpaca, "columns": _columns}
