"""Watching a run while it trains (`training.report_to`): every figure of history.jsonl and learning_curve.jsonl, the
training examples per second, and the expert-load heatmap at each dev point, in TensorBoard and Weights & Biases."""

from __future__ import annotations

import importlib
import math
import netrc
import os
import uuid
import warnings
from pathlib import Path

from loramix.report import expert_load_figure, plt

MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}  # what each of training.report_to needs


def scalars(record: dict, prefix: str) -> dict[str, float]:
    """Every number of a record but its step, nested mappings and lists flattened into `/`-joined names
    ({"aux": {"balance": 0.1}} -> {prefix + "aux/balance": 0.1}; a list's items by their index)."""
    flat: dict[str, float] = {}

    def visit(value: object, name: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                visit(item, f"{name}/{key}" if name else str(key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                visit(item, f"{name}/{index}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            flat[prefix + name] = float(value)

    visit({key: value for key, value in record.items() if key != "step"}, "")
    return flat


def tracker_module(name: str):
    """The module a tracker needs; ImportError naming the extra to install when it is missing."""
    try:
        return importlib.import_module(MODULES[name])
    except ImportError:
        raise ImportError(f"training.report_to: {name} needs the {name} extra: pip install 'loramix[{name}]'") from None


def _wandb_account() -> bool:
    """Whether W&B has a key here: WANDB_API_KEY or a `wandb login` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class Trackers:
    """The run's trackers (rank 0 only): a TensorBoard SummaryWriter writing to `<run>/tb/` and a W&B run in
    `<run>/wandb/` (offline where no account key is found and WANDB_MODE is unset; `wandb sync` uploads it).
    A resumed run drops the figures logged after `step`, its last checkpoint, as history.jsonl does."""

    def __init__(self, names: list[str], run_dir: Path, recipe, step: int = 0) -> None:
        self.writer = self.wandb = None
        if "tensorboard" in names:
            self.writer = tracker_module("tensorboard").SummaryWriter(
                str(run_dir / "tb"), purge_step=step + 1 if step else None
            )
        if "wandb" in names:
            wandb = tracker_module("wandb")
            id_file = run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            mode = None if os.environ.get("WANDB_MODE") or _wandb_account() else "offline"
            if mode:
                warnings.warn(
                    f"W&B logs offline (no account key): `wandb sync {run_dir / 'wandb'}` uploads it", stacklevel=2
                )
            self.wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "loramix"),
                name=recipe.name,
                id=run_id,
                resume="allow",
                dir=str(run_dir),
                config=recipe.to_dict(),
                mode=mode,
            )
            self.wandb.define_metric("*", step_metric="step")

    def log(self, record: dict, prefix: str) -> None:
        """A history.jsonl record ("train/") or learning_curve.jsonl line ("dev/"), at its step."""
        values = scalars(record, prefix)
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, record["step"])
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(values | {"step": record["step"]})

    def expert_load(self, routing: dict[str, dict], step: int) -> None:
        """The expert-load heatmap (loramix.report) of routing statistics {module: {"load", ...}} at a step."""
        if not routing or not any(sum(stats["load"]) for stats in routing.values()):
            return  # nothing routed yet
        if self.writer is not None:
            self.writer.add_figure("expert_load", expert_load_figure(routing, when=f"at step {step}"), step)
            self.writer.flush()
        if self.wandb is not None:
            import wandb

            figure = expert_load_figure(routing, when=f"at step {step}")
            self.wandb.log({"expert_load": wandb.Image(figure), "step": step})
            plt.close(figure)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
