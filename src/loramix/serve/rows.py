"""Per-row task adapters: a batch whose rows belong to different tasks runs in one forward (task router).

For the `task` router (MOELoRA) every task's update is a LoRA with the same stacked factors and its own
expert gates: Delta W_t = B diag(g_t) A with A = [A_1; ...; A_n] (n r x d_in), B = [B_1 ... B_n] (d_out x n r)
and g_t = scale * w_t repeated over each expert's rank. So a mixed batch needs no gathering of per-tenant
matrices (the S-LoRA / Punica batched-LoRA idea reduces to a per-row gate): each layer computes
y = W0 x + ((A x) * g_row) B^T with one product for A, one for B, for all rows at once.

`TaskRows` builds these layers once from a MixLoraModel and swaps them in for the length of a batch. Compared
with the model's own forward they skip the router and the per-call reshaping of B: the gates of a batch are
gathered once, not at every decoding step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loramix.layer import MixLoraLinear
from loramix.model import MixLoraModel
from loramix.targets import replace_module


class TaskRowLinear(nn.Module):
    """y = W0 x + ((A x) * g[task of the row]) B^T, the update of one task router layer with fixed gates."""

    def __init__(self, layer: MixLoraLinear, task_weights: Tensor) -> None:
        """`task_weights`: (num_tasks, n) the experts' weights of every task for this layer."""
        super().__init__()
        self.base_layer = layer.base_layer
        dtype = layer.base_layer.weight.dtype
        gates = (task_weights * layer.router.expert_scale).repeat_interleave(layer.rank, dim=-1)
        experts_A, experts_B = layer.stacked_experts()  # with the experts a continuing run added
        self.register_buffer("lora_A", experts_A.detach().flatten(0, 1).to(dtype), persistent=False)
        lora_B = experts_B.detach().transpose(0, 1).flatten(1).T.contiguous().to(dtype)
        self.register_buffer("lora_B", lora_B, persistent=False)  # (n r, d_out)
        self.register_buffer("task_gates", gates.to(dtype), persistent=False)  # (num_tasks, n r)
        self.row_gates: Tensor | None = None  # (batch, 1, n r), set by TaskRows.select

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        hidden = F.linear(x, self.lora_A) * self.row_gates
        return torch.addmm(result.flatten(0, -2), hidden.flatten(0, -2), self.lora_B).view_as(result)


class TaskRows:
    """The adapted layers of a task-router MixLoraModel as TaskRowLinear layers, used one batch at a time.

    The layers snapshot the model's adapter when built: rebuild after changing its weights.
    """

    def __init__(self, model: MixLoraModel) -> None:
        if model.mixlora_config.router != "task":
            raise ValueError(
                f"per-row task adapters need router='task', this model uses {model.mixlora_config.router!r}"
            )
        self.model = model
        per_task = [model.task_weights(task) for task in range(model.mixlora_config.num_tasks)]
        self.layers = {
            name: TaskRowLinear(layer, torch.stack([weights[name] for weights in per_task]))
            for name, layer in model.layers.items()
        }
        self._selected: Tensor | None = None  # the task ids whose gates the layers hold

    @contextmanager
    def select(self, task_ids: Tensor) -> Iterator[nn.Module]:
        """The base model, each row of a batch adapted by its task's update, for the length of the block.

        The model's MixLoraLinear layers are swapped out meanwhile: run nothing else on the model then.
        """
        if task_ids is not self._selected:  # a running batch keeps its task ids until its rows change
            for layer in self.layers.values():
                layer.row_gates = layer.task_gates[task_ids.to(layer.task_gates.device)].unsqueeze(1)
            self._selected = task_ids
        self._install(self.layers)
        try:
            yield self.model.base_model
        finally:
            self._install(self.model.layers)

    def _install(self, layers: dict[str, nn.Module]) -> None:
        for name, layer in layers.items():
            replace_module(self.model.base_model, name, layer)
