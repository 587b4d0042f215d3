"""MixLoraLinear: a frozen linear layer plus n LoRA experts, combined by a router."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from loramix.routing.base import ExpertSample, Router, Routing, RoutingContext
from loramix.targets import linear_features

CONTRAST_TOKENS = 64  # tokens per step (the same in every layer) whose experts enter the contrastive loss


class MixLoraLinear(nn.Module):
    """y = W0 x + scale * sum_i w_i B_i A_i x, with weights w from the router.

    The experts are stored stacked, A: (n, r, d_in) and B: (n, d_out, r), so that all of them are applied by
    two matrix products over the flattened (n r) rank dimension: no loop over experts or tokens. B starts at
    zero: a freshly wrapped layer computes exactly what the base layer does.

    `added_experts` m > 0 (a continuing run, `loramix.continual`) stacks m more experts apart, added_A and
    added_B, weighted by the router's last m weights and applied by their own two products after the others:
    a row whose weights for them are 0.0 gets exactly 0.0 from them, so it computes what it did before. Experts
    added by several continuations (a sequence of sizes, one per addition) are stored in the same two tensors and
    applied one addition at a time, each by its own products, so that adding more changes no earlier row.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        num_experts: int,
        rank: int,
        dropout: float,
        router: Router,
        context: RoutingContext,
        owns_router: bool = True,
        slot: int | None = None,
        added_experts: int | Sequence[int] = 0,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer)
        self.num_experts, self.rank, self.slot = num_experts, rank, slot
        weight = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, self.in_features, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, self.out_features, rank, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A.view(-1, self.in_features), a=math.sqrt(5))
        self.added_sizes = tuple(added_experts) if isinstance(added_experts, Sequence) else (added_experts,)
        self.added_sizes = tuple(size for size in self.added_sizes if size)
        self.added_experts = added_experts = sum(self.added_sizes)
        if added_experts:
            self.added_A = nn.Parameter(torch.empty(added_experts, rank, self.in_features, device=weight.device))
            self.added_B = nn.Parameter(torch.zeros(added_experts, self.out_features, rank, device=weight.device))
            nn.init.kaiming_uniform_(self.added_A.view(-1, self.in_features), a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.context = context
        if owns_router:
            self.router = router
        else:  # a router shared by several layers is owned by the MixLoraModel, not registered here
            object.__setattr__(self, "router", router)
        # (name, index) of this layer's memory queue in the MixLoraModel, set when it trains a contrastive loss
        self.memory_slot: tuple[str, int] | None = None
        self.samples_for_contrast = False  # set with memory_slot; a flag, so compiled blocks share one graph
        self.contrast_sample: ExpertSample | None = None  # this forward's, for the contrastive loss
        # set by a continuing run whose tasks use only the experts it adds (loramix.continual): while training,
        # every row weighs the older experts 0.0, so their products are skipped
        self.trains_last_addition_only = False

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        routing = self.router.route(x, self.context)
        dropped = self.dropout(x)
        if self.trains_last_addition_only and self.training:
            return result + self._last_addition(dropped, routing).to(result.dtype)
        hidden = F.linear(dropped, self.lora_A.flatten(0, 1)).unflatten(-1, (self.num_experts, self.rank))
        gates, up, added_up = self._gates_and_up(routing, hidden.dtype)
        if self.samples_for_contrast and self.training:
            self._sample_for_contrast(hidden, routing.indices, up)
        if added_up is None:
            update = F.linear((hidden * gates).flatten(-2), up)
        else:
            update = F.linear((hidden * gates[..., : self.num_experts, :]).flatten(-2), up)
            start = self.num_experts
            for experts_A, experts_up in zip(self.added_A.split(self.added_sizes), added_up, strict=True):
                count = experts_A.shape[0]
                added = F.linear(dropped, experts_A.flatten(0, 1)).unflatten(-1, (count, self.rank))
                update = update + F.linear((added * gates[..., start : start + count, :]).flatten(-2), experts_up)
                start += count
        return result + update.to(result.dtype)

    def _gates_and_up(self, routing: Routing, dtype: torch.dtype) -> tuple[Tensor, Tensor, list[Tensor] | None]:
        """(the experts' gates (B, T', n (+ m), 1), B as one (d_out, n r) matrix, added_B as one (d_out, m r)
        matrix per addition, or None). During `generate` they are kept for the call: B does not change, and a
        route computed once per prompt keeps its gates, so decoding steps only run the products."""
        cached = self.context.layer_cache.get(self) if self.context.generating else None
        if cached is not None and cached[0] is routing.weights:
            return cached[1:]
        if cached is not None:
            up, added_up = cached[2:]
        else:
            up = self.lora_B.transpose(0, 1).flatten(1)
            added_up = None
            if self.added_experts:
                added_up = [experts.transpose(0, 1).flatten(1) for experts in self.added_B.split(self.added_sizes)]
        gates = self._gates(routing, dtype)
        if self.context.generating:
            self.context.layer_cache[self] = (routing.weights, gates, up, added_up)
        return gates, up, added_up

    def _gates(self, routing: Routing, dtype: torch.dtype) -> Tensor:
        """(B, T', n (+ m), 1) each expert's weight times the expert scale."""
        weights = routing.weights if self.slot is None else routing.weights[..., self.slot : self.slot + 1]
        return (weights * self.router.expert_scale).unsqueeze(-1).to(dtype)

    def _last_addition(self, dropped: Tensor, routing: Routing) -> Tensor:
        """The update from the experts of the last addition alone: what `forward` adds up for rows that weigh
        every other expert 0.0 (each other product is exactly 0.0), without computing the others."""
        count = self.added_sizes[-1]
        added = F.linear(dropped, self.added_A[-count:].flatten(0, 1)).unflatten(-1, (count, self.rank))
        gates = self._gates(routing, added.dtype)[..., -count:, :]
        return F.linear((added * gates).flatten(-2), self.added_B[-count:].transpose(0, 1).flatten(1))

    def _sample_for_contrast(self, hidden: Tensor, indices: Tensor, up: Tensor) -> None:
        """Keep the expert activations of this forward's sampled tokens, and B as this forward used it, for the
        contrastive loss (computed after the forward, when a sharded layer no longer holds its whole B)."""
        picks = self.context.contrast_tokens(hidden, CONTRAST_TOKENS)
        active = indices.expand(*hidden.shape[:2], -1).flatten(0, 1)[picks]
        self.contrast_sample = ExpertSample(self, hidden.flatten(0, 1)[picks], active, up)

    def stacked_experts(self) -> tuple[Tensor, Tensor]:
        """(A (n, r, d_in), B (n, d_out, r)) of every expert, the added ones last."""
        if not self.added_experts:
            return self.lora_A, self.lora_B
        return torch.cat([self.lora_A, self.added_A]), torch.cat([self.lora_B, self.added_B])

    def delta_weight(self, expert_weights: Tensor) -> Tensor:
        """scale * sum_i w_i B_i A_i as a (d_out, d_in) matrix, for expert weights w: (n (+ m),)."""
        gates = (expert_weights * self.router.expert_scale).repeat_interleave(self.rank).to(self.lora_B.dtype)
        own = self.num_experts * self.rank
        delta = (self.lora_B.transpose(0, 1).flatten(1) * gates[:own]) @ self.lora_A.flatten(0, 1)
        if not self.added_experts:
            return delta
        start = own
        additions = zip(self.added_A.split(self.added_sizes), self.added_B.split(self.added_sizes), strict=True)
        for experts_A, experts_B in additions:
            end = start + experts_A.shape[0] * self.rank  # exactly 0.0 below for a task that does not use them
            delta = delta + (experts_B.transpose(0, 1).flatten(1) * gates[start:end]) @ experts_A.flatten(0, 1)
            start = end
        return delta

    @torch.no_grad()
    def merge_into_base(self, expert_weights: Tensor) -> nn.Module:
        """Add the update for fixed expert weights to the base layer's weight and return the base layer."""
        delta = self.delta_weight(expert_weights)
        weight = self.base_layer.weight
        weight += (delta.T if isinstance(self.base_layer, Conv1D) else delta).to(weight.dtype)
        return self.base_layer

    def extra_repr(self) -> str:
        sizes = self.added_sizes
        added = f", added_experts={sizes[0] if len(sizes) == 1 else list(sizes)}" if sizes else ""
        return f"experts={self.num_experts}{added}, rank={self.rank}, in={self.in_features}, out={self.out_features}"
