"""Files written atomically (a temporary file beside the target, moved into place once complete), and JSON
objects read back."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call write(temporary path) beside `path`, then move it into place (nothing is left if write fails)."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def read_json(path: Path, default: dict | None = None) -> dict:
    """The JSON object in `path`; `default` where there is no such file (None: FileNotFoundError). ValueError
    names the file when it holds something else."""
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        if default is None:
            raise FileNotFoundError(f"{path} is missing") from None
        return default
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(values).__name__}")
    return values
