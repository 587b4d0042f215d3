"""`task`: a task-motivated gate (MOELoRA, arXiv 2310.18339).

The gate sees only the task id: task -> embedding -> linear (no bias) -> softmax over the experts. One gate
is shared by all adapted layers by default. Since the weights depend on the task alone, each task's update
is an ordinary LoRA of the total rank and can be merged or exported (`MixLoraModel.merge_task`).

A continuing run (`loramix.continual`) may add experts that only tasks >= `added_from_task` use: their own
gate, `added_gate`, extends the softmax of those tasks, while an older task's weights are computed exactly as
before the experts were added (its weights for the added experts are 0.0).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from loramix.routing.base import Router, Routing, RoutingContext, register_router


@register_router("task")
class TaskRouter(Router):
    """w_t = softmax(W E[t]), dense over the experts, the same for every token of a sequence."""

    def __init__(self, config, in_features: int, num_experts: int, key: str) -> None:
        super().__init__(config, in_features, num_experts + config.added_experts, key)
        self.num_tasks = config.num_tasks
        self.embedding = nn.Embedding(config.num_tasks, config.task_embed_dim)
        self.gate = nn.Linear(config.task_embed_dim, num_experts, bias=False)
        added = config.added_experts
        self.added_gate = nn.Linear(config.task_embed_dim, added, bias=False) if added else None
        self.added_from_task = config.added_from_task
        # The experts split the total rank n * r between them; scale = alpha / total rank. Added experts keep
        # the scale of the run they were added to, so that the old tasks' updates do not change.
        self.expert_scale = config.alpha / (num_experts * config.expert_rank)

    def active_parameters(self) -> int:
        """One task embedding row and the gates."""
        gates = (self.gate, self.added_gate) if self.added_gate is not None else (self.gate,)
        return self.embedding.embedding_dim + sum(gate.weight.numel() for gate in gates)

    def task_logits(self, task_ids: Tensor) -> Tensor:
        """(len(task_ids), n) gate logits (the ids are validated by MixLoraModel); -inf where a task may not use
        an added expert."""
        embedded = self.embedding(task_ids)
        logits = self.gate(embedded).float()
        if self.added_gate is None:
            return logits
        added = self.added_gate(embedded).float().masked_fill(self._older(task_ids), float("-inf"))
        return torch.cat([logits, added], -1)

    def task_probs(self, task_ids: Tensor, logits: Tensor) -> Tensor:
        """The expert weights for `logits` = task_logits(task_ids): a softmax over the experts each task may use,
        computed for an older task over its own experts alone, as before experts were added."""
        probs = logits.softmax(-1)
        if self.added_gate is None:
            return probs
        own = self.gate.out_features
        before = logits[..., :own].contiguous().softmax(-1)
        return torch.cat([torch.where(self._older(task_ids), before, probs[..., :own]), probs[..., own:]], -1)

    def _older(self, task_ids: Tensor) -> Tensor:
        """(len(task_ids), 1) whether each task is older than the added experts."""
        return (task_ids < self.added_from_task).unsqueeze(-1)

    def forward(self, x: Tensor, context: RoutingContext) -> Routing:
        task_ids = context.task_ids_for(x.shape[0]).to(x.device)
        logits = self.task_logits(task_ids)
        probs = self.task_probs(task_ids, logits).unsqueeze(1)
        return Routing(weights=probs, probs=probs, logits=logits.unsqueeze(1))
