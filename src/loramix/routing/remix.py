"""`remix`: reinforcement routing (ReMix, arXiv 2603.10160).

Every active expert gets the same constant weight, so no expert can dominate (ESS == k). In training the
k experts are sampled from the router's distribution without replacement and the router learns from the
RLOO estimator (see `losses.rloo_surrogate`); at inference the k most probable experts are used.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from loramix.routing.base import Router, Routing, RoutingContext, register_router


def sample_without_replacement(log_probs: Tensor, k: int) -> Tensor:
    """k distinct indices per row, in the order of k sequential categorical draws (Gumbel top-k)."""
    uniform = torch.rand_like(log_probs).clamp_(1e-20, 1.0)
    return (log_probs - (-uniform.log()).log()).topk(k, dim=-1).indices


@register_router("remix")
class ReMixRouter(Router):
    """q = softmax(P x); the active set is sampled (training) or the top-k (inference); weights constant."""

    def __init__(self, config, in_features: int, num_experts: int, key: str) -> None:
        super().__init__(config, in_features, num_experts, key)
        self.gate = nn.Linear(in_features, num_experts, bias=False)
        active_rank = self.top_k * config.expert_rank
        if config.remix_scaling == "rslora":
            self.expert_scale = config.alpha / math.sqrt(active_rank)
        else:
            self.expert_scale = config.alpha / active_rank

    def routing_input(self, x: Tensor, context: RoutingContext) -> Tensor:
        """x cut from the graph: the RLOO estimate trains the router alone, and the experts below it get the
        gradient of the loss only (without the cut, the surrogate's score-function term reaches every expert
        through the router's input: on SmolLM2 it raised the answer cross-entropy of a symptom2disease run
        after 60-120 steps from 0.67 to 0.73, docs/RESULTS.md)."""
        return x.detach()

    def forward(self, x: Tensor, context: RoutingContext) -> Routing:
        logits = self.gate(x).float()
        log_probs = logits.log_softmax(-1)
        if self.training:
            indices = sample_without_replacement(log_probs.detach(), self.top_k)
        else:
            indices = log_probs.topk(self.top_k, dim=-1).indices
        weights = torch.zeros_like(logits).scatter(-1, indices, 1.0)
        # The selection's log-probability (Routing.log_prob) is left to the loss, which takes it for all layers at once.
        return Routing(weights=weights, probs=log_probs.exp(), logits=logits, indices=indices, sampled=self.training)
