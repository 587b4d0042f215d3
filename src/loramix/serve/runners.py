"""Runners: how one forward of a running batch runs for a kind of model, with each row's own adapter state.

A forward takes the new tokens of every row (a prompt's, left-padded, or one per row in a decoding step), the
batch's 2-D attention mask and position ids, its key-value cache, the rows' task ids and what the rows computed
once from their prompts (a RowState); it returns the logits of each row's last token and the rows' state after it.
"""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod

from torch import Tensor, nn
from transformers import DynamicCache

from loramix.call import RowState
from loramix.methods import AdaptedModel
from loramix.serve.rows import TaskRows


class Runner(ABC):
    """Runs forwards of the rows of one running batch."""

    @abstractmethod
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        cache: DynamicCache,
        task_ids: Tensor,
        state: RowState | None,
    ) -> tuple[Tensor, RowState | None]:
        """(logits of each row's last token (B, V), the rows' state after this forward); `state` is None for new
        prompts."""


def last_logits(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, cache: DynamicCache
) -> Tensor:
    """(B, V) logits of each row's last token from a Hugging Face causal LM, filling `cache`."""
    cache_name, keeps_logits = _forward_arguments(type(model))
    extra = {"logits_to_keep": 1} if keeps_logits else {}
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        **extra,
        **{cache_name: cache},
    )
    return output.logits[:, -1]


@functools.cache
def _forward_arguments(model_class: type) -> tuple[str, bool]:
    """(the name of the key-value cache argument: `cache` from transformers 5.x on, else `past_key_values`;
    whether the forward computes the logits of the last positions only)."""
    parameters = inspect.signature(model_class.forward).parameters
    return ("cache" if "cache" in parameters else "past_key_values"), "logits_to_keep" in parameters


class PlainRunner(Runner):
    """A model without per-row state: a base model, a merged task, or a peft model (its LoRA layers in place)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, cache, task_ids, state):
        return last_logits(self.model, input_ids, attention_mask, position_ids, cache), None


class AdaptedRunner(Runner):
    """A loramix AdaptedModel: each row's task id, and what it computed once from its prompt (routes, PEDRO's
    vectors, IAPT's soft tokens), go with the row from forward to forward."""

    def __init__(self, model: AdaptedModel) -> None:
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, cache, task_ids, state):
        with self.model.prompt_routing(task_ids):
            if state is not None:
                self.model.context.resume(state)
            logits = last_logits(self.model.base_model, input_ids, attention_mask, position_ids, cache)
            return logits, self.model.context.row_state()


class TaskRowsRunner(Runner):
    """A task-router mixture: every row adapted by its own task's gates (TaskRows); nothing else per row."""

    def __init__(self, rows: TaskRows) -> None:
        self.rows = rows

    def forward(self, input_ids, attention_mask, position_ids, cache, task_ids, state):
        with self.rows.select(task_ids) as model:
            return last_logits(model, input_ids, attention_mask, position_ids, cache), None
