"""loramix under transformers.Trainer and TRL's SFTTrainer: batches with task ids, adapter checkpoints, routing logs.

A MixLoraModel trains under a stock `Trainer` as it is: its forward with `labels` returns `compute_loss`'s loss.
What the stock Trainer cannot do is checkpoint it: a model that is not a PreTrainedModel is saved as its whole
state dict (the frozen base included). `MixLoraTrainer` (and `sft_trainer_class()` for TRL) write and resume
from loramix's own adapter files instead, which `loramix.load` reads:

    trainer = MixLoraTrainer(model=wrapped, args=TrainingArguments(...), train_dataset=rows,
                             data_collator=TaskCollator(tokenizer.pad_token_id))
    trainer.train()                     # checkpoint-N/ holds loramix_config.json + adapter.safetensors
    loramix.load(base, "out/checkpoint-N")

Rows are encoded examples: `input_ids`, `labels` (-100 where not scored), optionally `attention_mask` and
`task_ids` (one int per row; named as the forward's argument, so that Trainer keeps the column).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from loramix.data import collate
from loramix.extras import requires
from loramix.methods import AdaptedModel
from loramix.model import WEIGHTS_NAME, read_adapter

ROW_KEYS = ("input_ids", "attention_mask", "labels")


class TaskCollator:
    """A Trainer data collator: pads rows (lists or tensors) of input_ids, attention_mask and labels on the right
    (loramix.data.collate) and stacks their `task_ids` (or `task_id`) into the batch's `task_ids`."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        converted = []
        for number, row in enumerate(rows):
            if "input_ids" not in row:
                raise ValueError(f"row {number} of the batch has no input_ids (it has {sorted(row)})")
            item = {key: _as_list(row[key]) for key in ROW_KEYS if key in row}
            item.setdefault("attention_mask", [1] * len(item["input_ids"]))
            task = row.get("task_ids", row.get("task_id"))
            if task is not None:
                item["task_id"] = int(task)
            converted.append(item)
        return collate(converted, self.pad_token_id)


def _as_list(value) -> list[int]:
    return value.tolist() if isinstance(value, torch.Tensor) else list(value)


class RoutingStatsCallback(TrainerCallback):
    """Adds the routers' statistics since the previous log to each Trainer log (and its log_history entry):
    `routing/ess` (mean effective support size of the tokens' expert weights), `routing/load_ess` (the effective
    number of experts the load is spread over, 1 / sum(load^2), averaged over adapted modules) and the parts of
    the last loss (`loss/ce`, `loss/balance`, `loss/rloo`, ...)."""

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        wrapped = _adapted(model)
        if wrapped is None or logs is None or "loss" not in logs:
            return
        stats = [s for s in wrapped.routing_stats().values() if s.get("load")]
        added = {}
        if stats:
            added["routing/ess"] = sum(s["ess"] for s in stats) / len(stats)
            added["routing/load_ess"] = sum(1 / sum(x * x for x in s["load"]) for s in stats) / len(stats)
        added.update({f"loss/{name}": float(value) for name, value in getattr(wrapped, "last_losses", {}).items()})
        wrapped.reset_routing_stats()
        logs.update(added)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(added)


def _adapted(model) -> AdaptedModel | None:
    """The loramix model inside what Trainer holds (itself, or wrapped by accelerate / DDP), else None."""
    while model is not None and not isinstance(model, AdaptedModel):
        model = getattr(model, "module", None)
    return model


class MixLoraCheckpoints:
    """Trainer methods for a MixLoraModel: checkpoints and `save_model` write loramix's adapter files (atomic,
    safetensors; `loramix.load` reads them) and resuming loads them back. Mix into a Trainer class first."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        wrapped = _adapted(self.model)
        if wrapped is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            wrapped.save_pretrained(output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        wrapped = _adapted(model if model is not None else self.model)
        folder = Path(resume_from_checkpoint)
        if wrapped is None or not (folder / WEIGHTS_NAME).is_file():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        config, state = read_adapter(folder)
        if config != wrapped.mixlora_config:
            raise ValueError(
                f"{folder} holds an adapter of another config than the model's: {config} != {wrapped.mixlora_config}"
            )
        wrapped.load_adapter_state_dict(state, source=os.fspath(folder / WEIGHTS_NAME))

    def _load_best_model(self) -> None:
        wrapped = _adapted(self.model)
        if wrapped is None:
            return super()._load_best_model()
        self._load_from_checkpoint(self.state.best_model_checkpoint)


class MixLoraTrainer(MixLoraCheckpoints, Trainer):
    """transformers.Trainer with loramix adapter checkpoints and routing statistics in its logs."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.callback_handler.callbacks.insert(0, RoutingStatsCallback())  # before the loggers read the logs


@functools.cache
def sft_trainer_class() -> type:
    """TRL's SFTTrainer with loramix adapter checkpoints and routing statistics (the `trainer` extra)."""
    with requires("trainer", "sft_trainer_class()"):
        from trl import SFTTrainer

    class MixLoraSFTTrainer(MixLoraCheckpoints, SFTTrainer):
        __doc__ = "trl.SFTTrainer with loramix's loss and adapter checkpoints and routing statistics in its logs."

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.callback_handler.callbacks.insert(0, RoutingStatsCallback())

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """The model's own training loss (auxiliary losses, RLOO), not SFTTrainer's plain cross-entropy
            (so its entropy and token-accuracy metrics are not logged)."""
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return MixLoraSFTTrainer


__all__ = ["MixLoraCheckpoints", "MixLoraTrainer", "RoutingStatsCallback", "TaskCollator"]
