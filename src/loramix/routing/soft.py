"""`soft`: a dense softmax mixture of all experts (MoLoRA, arXiv 2309.05444)."""

from __future__ import annotations

from torch import Tensor, nn

from loramix.routing.base import Router, Routing, RoutingContext, register_router


@register_router("soft")
class SoftRouter(Router):
    """s = softmax(W_g x); every expert is active with weight s_i."""

    def __init__(self, config, in_features: int, num_experts: int, key: str) -> None:
        super().__init__(config, in_features, num_experts, key)
        self.gate = nn.Linear(in_features, num_experts, bias=False)

    def forward(self, x: Tensor, context: RoutingContext) -> Routing:
        logits = self.gate(x).float()
        probs = logits.softmax(-1)
        return Routing(weights=probs, probs=probs, logits=logits)
