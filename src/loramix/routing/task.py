"""`task`: a task-motivated gate (MOELoRA, arXiv 2310.18339).

The gate sees only the task id: task -> embedding -> linear (no bias) -> softmax over the experts. One gate
is shared by all adapted layers by default. Since the weights depend on the task alone, each task's update
is an ordinary LoRA of the total rank and can be merged or exported (`MixLoraModel.merge_task`).
"""

from __future__ import annotations

from torch import Tensor, nn

from loramix.routing.base import Router, Routing, RoutingContext, register_router


@register_router("task")
class TaskRouter(Router):
    """w_t = softmax(W E[t]), dense over the experts, the same for every token of a sequence."""

    def __init__(self, config, in_features: int, num_experts: int, key: str) -> None:
        super().__init__(config, in_features, num_experts, key)
        self.num_tasks = config.num_tasks
        self.embedding = nn.Embedding(config.num_tasks, config.task_embed_dim)
        self.gate = nn.Linear(config.task_embed_dim, num_experts, bias=False)
        # The experts split the total rank n * r between them; scale = alpha / total rank.
        self.expert_scale = config.alpha / (num_experts * config.expert_rank)

    def active_parameters(self) -> int:
        """One task embedding row and the gate."""
        return self.embedding.embedding_dim + self.gate.weight.numel()

    def task_logits(self, task_ids: Tensor) -> Tensor:
        """(len(task_ids), n) gate logits (the ids are validated by MixLoraModel)."""
        return self.gate(self.embedding(task_ids)).float()

    def forward(self, x: Tensor, context: RoutingContext) -> Routing:
        logits = self.task_logits(context.task_ids_for(x.shape[0]).to(x.device)).unsqueeze(1)
        probs = logits.softmax(-1)
        return Routing(weights=probs, probs=probs, logits=logits)
