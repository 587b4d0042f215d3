"""`task`: a task-motivated gate (MOELoRA, arXiv 2310.18339).

The gate sees only the task id: task -> embedding -> linear (no bias) -> softmax over the experts. One gate
is shared by all adapted layers by default. Since the weights depend on the task alone, each task's update
is an ordinary LoRA of the total rank and can be merged or exported (`MixLoraModel.merge_task`).

A continuing run (`loramix.continual`) may add experts that only tasks >= `added_from_task` use: their own
gate, `added_gate`, extends the softmax of those tasks, while an older task's weights are computed exactly as
before the experts were added (its weights for the added experts are 0.0). Each later continuation may add
experts again (`MixLoraConfig.added_groups`): a task's softmax spans the experts that existed when it was added,
or, for an exclusive addition (`added_exclusive`), only the experts added with it (its weights for the older
ones are 0.0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loramix.routing.base import Router, Routing, RoutingContext, register_router


@register_router("task")
class TaskRouter(Router):
    """w_t = softmax(W E[t]), dense over the experts, the same for every token of a sequence."""

    def __init__(self, config, in_features: int, num_experts: int, key: str) -> None:
        super().__init__(config, in_features, num_experts + sum(m for _, m in config.added_groups()), key)
        self.num_tasks = config.num_tasks
        self.embedding = nn.Embedding(config.num_tasks, config.task_embed_dim)
        self.gate = nn.Linear(config.task_embed_dim, num_experts, bias=False)
        self.added_groups = config.added_groups()  # [(first task id, experts)] of each addition
        self.exclusive = config.exclusive_additions()  # of each addition: its tasks use only its experts
        added = sum(count for _, count in self.added_groups)
        self.added_gate = nn.Linear(config.task_embed_dim, added, bias=False) if added else None
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
        logits = [self.gate(embedded).float()]
        start = 0
        for first, count in self.added_groups:  # each addition's gate rows by their own product
            added = F.linear(embedded, self.added_gate.weight[start : start + count]).float()
            logits.append(added.masked_fill(self._older(task_ids, first), float("-inf")))
            start += count
        if not any(self.exclusive):
            return torch.cat(logits, -1) if len(logits) > 1 else logits[0]
        logits, start = torch.cat(logits, -1), self.gate.out_features
        firsts = [first for first, _ in self.added_groups[1:]] + [self.num_tasks]
        for (first, count), last, exclusive in zip(self.added_groups, firsts, self.exclusive, strict=True):
            if exclusive:  # this addition's tasks see none of the experts that existed before it
                added = ~self._older(task_ids, first) & self._older(task_ids, last)
                logits = torch.cat([logits[..., :start].masked_fill(added, float("-inf")), logits[..., start:]], -1)
            start += count
        return logits

    def task_probs(self, task_ids: Tensor, logits: Tensor) -> Tensor:
        """The expert weights for `logits` = task_logits(task_ids): a softmax over the experts each task may use,
        computed for an older task over its own experts alone, as before experts were added."""
        probs = logits.softmax(-1)
        total, end = probs.shape[-1], probs.shape[-1]
        for first, count in reversed(self.added_groups):  # the oldest tasks' choice is made last
            end -= count
            before = F.pad(logits[..., :end].contiguous().softmax(-1), (0, total - end))
            probs = torch.where(self._older(task_ids, first), before, probs)
        return probs

    @staticmethod
    def _older(task_ids: Tensor, first: int) -> Tensor:
        """(len(task_ids), 1) whether each task is older than the experts added for tasks from `first` on."""
        return (task_ids < first).unsqueeze(-1)

    def forward(self, x: Tensor, context: RoutingContext) -> Routing:
        task_ids = context.task_ids_for(x.shape[0]).to(x.device)
        logits = self.task_logits(task_ids)
        probs = self.task_probs(task_ids, logits).unsqueeze(1)
        return Routing(weights=probs, probs=probs, logits=logits.unsqueeze(1))
