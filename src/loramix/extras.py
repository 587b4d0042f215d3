"""Optional features and the extras that install them: a missing one fails in one line that names its extra.

Each feature imports its optional packages where it starts, inside `requires(extra, feature)`:

    with requires("serve", "the HTTP server"):
        import uvicorn

so the core install (`pip install loramix`) imports and trains without them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class MissingExtra(ModuleNotFoundError):
    """A feature's optional package is not installed; the message names the extra that installs it."""


@contextmanager
def requires(extra: str, feature: str) -> Iterator[None]:
    """Turn a missing module inside the block into a MissingExtra: `feature needs X: pip install 'loramix[extra]'`."""
    try:
        yield
    except ModuleNotFoundError as error:
        package = (error.name or "").partition(".")[0]  # what to install: the top package, not a submodule
        message = f"{feature} needs {package}, which is not installed: pip install 'loramix[{extra}]'"
        raise MissingExtra(message, name=package) from error
