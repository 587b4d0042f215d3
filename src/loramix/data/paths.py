"""Where the medical data lives: an explicit folder, $LORAMIX_DATA_DIR, or ../shared/data/medical."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "LORAMIX_DATA_DIR"
DEFAULT_RELATIVE = Path("..") / "shared" / "data" / "medical"


def repository_root() -> Path | None:
    """The nearest folder above this package holding a pyproject.toml (None when installed elsewhere)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file():
            return parent
    return None


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The medical data folder: `data_dir`, else $LORAMIX_DATA_DIR, else <repository>/../shared/data/medical,
    else <working directory>/../shared/data/medical. Raises FileNotFoundError listing every place looked at."""
    if data_dir is not None:
        candidates = [Path(data_dir).expanduser()]
    elif os.environ.get(DATA_ENV):
        candidates = [Path(os.environ[DATA_ENV]).expanduser()]
    else:
        root = repository_root()
        defaults = ([root / DEFAULT_RELATIVE] if root else []) + [Path.cwd() / DEFAULT_RELATIVE]
        candidates = list(dict.fromkeys(path.resolve() for path in defaults))
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"no medical data folder; looked in: {looked}. Pass a data folder (--data-dir) or set {DATA_ENV}."
    )


def require_file(folder: Path, name: str) -> Path:
    """`folder / name`, which must be a file (FileNotFoundError naming the exact path otherwise)."""
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"missing data file {path}")
    return path
