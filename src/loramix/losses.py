"""Auxiliary losses: Switch load balance, router z-loss, the ReMix RLOO surrogate, expert contrast."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of values (..., B, T, *rest) over the (B, T) positions where mask (..., B, T) is true; leading
    dimensions (one per router, say) are kept."""
    dims = (mask.dim() - 2, mask.dim() - 1)
    weight = mask.to(values.dtype).view(*mask.shape, *([1] * (values.dim() - mask.dim())))
    return (values * weight).sum(dims) / weight.sum(dims).clamp_min(1)


def load_balance_loss(probs: Tensor, top1: Tensor, mask: Tensor) -> Tensor:
    """Switch Transformer loss n * sum_i f_i P_i; 1.0 when routing is perfectly balanced.

    probs: (..., B, T, n) router probabilities; top1: (..., B, T) each token's first choice; mask: (..., B, T)
    real tokens. Leading dimensions (routers stacked) give one loss each.
    """
    num_experts = probs.shape[-1]
    fraction = masked_mean(F.one_hot(top1, num_experts).to(probs.dtype), mask)
    return num_experts * (fraction * masked_mean(probs, mask)).sum(-1)


def router_z_loss(logits: Tensor, mask: Tensor) -> Tensor:
    """ST-MoE z-loss: mean over real tokens of logsumexp(logits)^2 (one per leading index, as masked_mean)."""
    return masked_mean(torch.logsumexp(logits.float(), -1).square(), mask)


def rloo_surrogate(sequence_losses: Tensor, log_probs: Tensor) -> Tensor:
    """Surrogate whose gradient is the RLOO (REINFORCE leave-one-out) estimate for the router.

    sequence_losses, log_probs: (M, B) per-sequence loss and selection log-probability of M routing samples
    of the same batch. The reward is -loss; the baseline is the mean of the other M-1 samples of the sequence.
    Its value is zero (so logged losses stay cross-entropy plus auxiliary terms); only its gradient matters.
    """
    samples = sequence_losses.shape[0]
    advantage = (sequence_losses - sequence_losses.mean(0, keepdim=True)).detach() * samples / (samples - 1)
    return (advantage * (log_probs - log_probs.detach())).mean()


class ExpertMemoryQueue(nn.Module):
    """Per-expert FIFO queues of detached, normalised expert representations from earlier batches."""

    def __init__(self, num_experts: int, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("queue", torch.zeros(num_experts, size, dim))
        self.register_buffer("filled", torch.zeros(num_experts, size, dtype=torch.bool))
        self.register_buffer("position", torch.zeros(num_experts, dtype=torch.long))

    @torch.no_grad()
    def push(self, representations: Tensor, experts: Tensor) -> None:
        """Add representations (S, d) to the queues of their experts (S,), oldest out first."""
        num_experts, size = self.filled.shape
        order = experts.argsort(stable=True)
        experts = experts[order]
        counts = torch.bincount(experts, minlength=num_experts)
        rank = torch.arange(len(experts), device=experts.device) - (counts.cumsum(0) - counts)[experts]
        # Written in arrival order, only the last `size` rows of each expert would survive.
        keep = rank >= counts[experts] - size
        slots = (self.position[experts] + rank) % size
        self.queue[experts[keep], slots[keep]] = representations[order][keep].to(self.queue.dtype)
        self.filled[experts[keep], slots[keep]] = True
        self.position.copy_((self.position + counts) % size)


def expert_contrastive_loss(
    representations: Tensor, active: Tensor, queue: ExpertMemoryQueue, temperature: float
) -> Tensor:
    """InfoNCE between experts (SparseDoctor design, after CoMoE).

    representations: (S, n, d) normalised outputs of every expert for S tokens; active: (S, k) the experts
    each token was routed to. For each token and active expert (the query), the other active experts'
    outputs are positives and the queued representations of the inactive experts are negatives.
    """
    tokens, num_experts, _ = representations.shape
    k = active.shape[1]
    if k < 2:
        raise ValueError("the contrastive loss needs top_k >= 2 (positives are the other active experts)")
    queries = representations.gather(1, active.unsqueeze(-1).expand(-1, -1, representations.shape[-1]))
    positive_logits = queries @ queries.transpose(1, 2) / temperature  # (S, k, k)
    is_active = torch.zeros(tokens, num_experts, dtype=torch.bool, device=active.device)
    is_active.scatter_(1, active, True)
    negatives = queue.queue.to(queries.dtype, copy=True)  # (n, Q, d); a copy: the queue moves on before backward
    negative_logits = torch.einsum("skd,nqd->sknq", queries, negatives) / temperature
    usable = (~is_active)[:, None, :, None] & queue.filled[None, None]
    negative_logits = negative_logits.masked_fill(~usable, float("-inf")).flatten(2)  # (S, k, n Q)
    # Each (query, positive) pair is one InfoNCE term against all the query's negatives.
    off_diagonal = ~torch.eye(k, dtype=torch.bool, device=active.device)
    pairs = positive_logits[:, off_diagonal].view(tokens, k, k - 1)
    negative_mass = torch.logsumexp(negative_logits, -1, keepdim=True).expand_as(pairs)
    denominator = torch.logaddexp(pairs, negative_mass)
    return (denominator - pairs).mean()
