"""`topk`: learned top-k routing with renormalised weights (MixLoRA, arXiv 2404.15159)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from loramix.routing.base import Router, Routing, RoutingContext, register_router


@register_router("topk")
class TopKRouter(Router):
    """s = softmax(W_g x); keep the k largest and renormalise them. Trained with the Switch balance loss.

    The renormalised top-k of the softmax is the softmax of the top-k logits, which takes fewer operations.
    """

    balance_loss = True

    def __init__(self, config, in_features: int, num_experts: int, key: str) -> None:
        super().__init__(config, in_features, num_experts, key)
        self.gate = nn.Linear(in_features, num_experts, bias=False)

    def forward(self, x: Tensor, context: RoutingContext) -> Routing:
        logits = self.gate(x).float()
        probs = logits.softmax(-1)
        top, indices = logits.topk(self.top_k, dim=-1)
        weights = torch.zeros_like(probs).scatter(-1, indices, top.softmax(-1))
        return Routing(weights=weights, probs=probs, logits=logits, indices=indices)
