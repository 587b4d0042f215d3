"""`prompt`: prompt-aware routing over the LoRA modules of a decoder layer (MiLoRA, arXiv 2410.18035).

The experts are the adapted modules of one decoder layer (q, k, v, o, gate, up, down ...), each its own
LoRA. One router per decoder layer pools the prompt's hidden states entering that layer, applies a learnable
rational activation and picks the top-k modules; a selected module's output is scaled by its probability.
The route is computed once per sequence, on the prompt, and reused for every generated token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from loramix.routing.base import PromptPooling, Router, Routing, RoutingContext, register_router

# P(x) / Q(x) with Q(x) = 1 + sum_j |b_j| |x|^j (a "safe" Pade activation unit), fitted by least squares
# to GELU on [-5, 5] (max error 0.018).
GELU_NUMERATOR = (-0.0024244525, 0.50031557, 0.40677924, 0.10961425, 0.013486269, 0.0020186133, 0.00026077894)
GELU_DENOMINATOR = (0.035073781, 0.2032057, 2.6783079e-05, 0.0044478698, 2.7006902e-11)


class RationalActivation(nn.Module):
    """A learnable rational function of degree 6 over 5, initialised to approximate GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.numerator = nn.Parameter(torch.tensor(GELU_NUMERATOR))
        self.denominator = nn.Parameter(torch.tensor(GELU_DENOMINATOR))

    def forward(self, x: Tensor) -> Tensor:
        powers = x.unsqueeze(-1) ** torch.arange(len(GELU_NUMERATOR), device=x.device, dtype=x.dtype)
        numerator = powers @ self.numerator.to(x.dtype)
        denominator = 1 + powers[..., 1 : len(GELU_DENOMINATOR) + 1].abs() @ self.denominator.abs().to(x.dtype)
        return numerator / denominator


@register_router("prompt")
class PromptRouter(Router):
    """p = softmax(g(pool(H)) W_r) over the m modules of one decoder layer, H = the layer's input."""

    balance_loss = True

    def __init__(self, config, in_features: int, num_experts: int, key: str) -> None:
        super().__init__(config, in_features, num_experts, key)
        self.sequence_level = True
        self.pool = PromptPooling(in_features, config.prompt_pooling)
        self.activation = RationalActivation()
        self.gate = nn.Linear(in_features, num_experts, bias=False)

    def routing_input(self, x: Tensor, context: RoutingContext) -> Tensor:
        """The hidden states entering this router's decoder layer (captured by `capture_block_input`)."""
        return self.block_input.hidden

    def forward(self, x: Tensor, context: RoutingContext) -> Routing:
        logits = self.gate(self.activation(x.to(self.gate.weight.dtype))).float()
        probs = logits.softmax(-1)
        top, indices = probs.topk(self.top_k, dim=-1)
        weights = torch.zeros_like(probs).scatter(-1, indices, top)
        return Routing(weights=weights, probs=probs, logits=logits, indices=indices)
