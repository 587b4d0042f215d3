"""`adalink`: non-intrusive input-centric adaptation (AdaLink, arXiv 2310.12100).

A low-rank residual adapter between the input embeddings and the first decoder layer, e' = e + s B A e; the
transformer itself is untouched. With `per_task` every task (tenant) has its own A and B, so tenants of one
backbone differ only in their input embeddings, and a batch of mixed tenants runs as one batch: each row
gathers its tenant's factors (two batched products). B starts at zero: a freshly wrapped model computes what
the base model computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from loramix.call import CallState
from loramix.methods.base import AdaptedModel, MethodConfig, register_method


@dataclass
class AdaLinkConfig(MethodConfig):
    """Settings of an AdaLink input-embedding adapter."""

    rank: int = field(default=8, metadata={"help": "Rank r of the embedding adapter."})
    alpha: float = field(default=16.0, metadata={"help": "Scaling numerator: the update is alpha / r * B A e."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    per_task: bool = field(default=True, metadata={"help": "One adapter per task id (tenant), or one for all."})
    num_tasks: int | None = field(default=None, metadata={"help": "Number of task ids (required by per_task)."})

    def __post_init__(self) -> None:
        self._check_integers(("rank",))
        self._check_numbers(("alpha",), strict=True)
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            self._fail("dropout", self.dropout, "expected 0 <= dropout < 1")
        if not isinstance(self.per_task, bool):
            self._fail("per_task", self.per_task, "expected true or false")
        if self.num_tasks is not None:
            self._check_integers(("num_tasks",))
        if self.per_task and self.num_tasks is None:
            self._fail("num_tasks", self.num_tasks, "per_task adapters need num_tasks, an integer >= 1")

    def card_details(self) -> tuple[tuple[str, str], dict[str, str]]:
        method = ("AdaLink, input-centric adaptation of the embeddings", "arXiv 2310.12100")
        adapters = f"one per task ({self.num_tasks})" if self.per_task else "one for all tasks"
        return method, {"rank": str(self.rank), "alpha": str(self.alpha), "adapters": adapters}


class EmbeddingAdapter(nn.Module):
    """e + s B_t A_t e for the adapter t of each row (t = 0 for all rows with one adapter)."""

    def __init__(self, config: AdaLinkConfig, dim: int, context: CallState, device: torch.device) -> None:
        super().__init__()
        count = config.num_tasks if config.per_task else 1
        self.lora_A = nn.Parameter(torch.empty(count, config.rank, dim, device=device))
        self.lora_B = nn.Parameter(torch.zeros(count, dim, config.rank, device=device))
        for matrix in self.lora_A:
            nn.init.kaiming_uniform_(matrix, a=math.sqrt(5))
        self.scale = config.alpha / config.rank
        self.per_task = config.per_task
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.context = context

    def forward(self, embeddings: Tensor) -> Tensor:
        x = self.dropout(embeddings)
        if self.per_task:
            rows = self.context.task_ids_for(x.shape[0]).to(x.device)
            down, up = self.lora_A[rows], self.lora_B[rows]  # (B, r, d), (B, d, r)
            update = (x @ down.transpose(1, 2).to(x.dtype)) @ up.transpose(1, 2).to(x.dtype)
        else:
            update = (x @ self.lora_A[0].T.to(x.dtype)) @ self.lora_B[0].T.to(x.dtype)
        return embeddings + (self.scale * update).to(embeddings.dtype)


@register_method("adalink", AdaLinkConfig)
class AdaLinkModel(AdaptedModel):
    """A frozen causal LM whose input embeddings pass through an AdaLink adapter (a forward hook)."""

    def __init__(self, model: nn.Module, config: AdaLinkConfig) -> None:
        super().__init__(model, config)
        self.needs_task_ids = config.per_task
        embeddings = model.get_input_embeddings()
        device = embeddings.weight.device
        self.embedding_adapter = EmbeddingAdapter(config, embeddings.embedding_dim, self.context, device)
        name = next(name for name, module in model.named_modules() if module is embeddings)
        adapter = self.embedding_adapter
        self._add_hook(name, embeddings.register_forward_hook(lambda module, args, output: adapter(output)))

    def count_parameters(self) -> dict[str, int]:
        """A token uses its own task's A and B (all adapters train)."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"trainable": trainable, "active_per_token": trainable // len(self.embedding_adapter.lora_A)}
