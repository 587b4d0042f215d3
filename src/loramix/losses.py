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
    """Per-expert FIFO queues of detached, normalised expert representations from earlier batches.

    A push is written when the queue is next read (or saved), not at once: the loss that read the queue in
    this step needs its contents until its backward, and writing after it spares copying every queue in
    every step. Should a push be written while such a backward is still to come, the queue is copied first.
    """

    def __init__(self, num_experts: int, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("queue", torch.zeros(num_experts, size, dim))
        self.register_buffer("filled", torch.zeros(num_experts, size, dtype=torch.bool))
        self.register_buffer("position", torch.zeros(num_experts, dtype=torch.long))
        self._pending: list[tuple[Tensor, Tensor]] = []
        self._awaiting_backward = False
        self.register_state_dict_pre_hook(lambda module, prefix, keep_vars: module.flush())
        self.register_load_state_dict_pre_hook(lambda module, *args: module._pending.clear())

    def push(self, representations: Tensor, experts: Tensor) -> None:
        """Add representations (S, d) to the queues of their experts (S,), oldest out first."""
        self._pending.append((representations.detach(), experts))

    def negative_logits(self, queries: Tensor, active: Tensor) -> Tensor:
        """(S, k, n Q) dot products of queries (S, k, d) with every queued representation; -inf for empty
        slots and for the queues of the token's active experts (S, k), which are not its negatives."""
        self.flush()
        num_experts = self.filled.shape[0]
        queued = self.queue.flatten(0, 1).to(queries.dtype)
        logits = (queries.flatten(0, 1) @ queued.T).view(*queries.shape[:2], num_experts, -1)
        is_active = torch.zeros(len(active), num_experts, dtype=torch.bool, device=active.device)
        is_active.scatter_(1, active, True)
        logits = logits.masked_fill_(is_active[:, None, :, None] | ~self.filled, float("-inf")).flatten(2)
        if logits.requires_grad:
            self._awaiting_backward = True
            logits.register_hook(self._backward_reached)
        return logits

    def _backward_reached(self, grad: Tensor) -> None:
        self._awaiting_backward = False

    @torch.no_grad()
    def flush(self) -> None:
        """Write the pushed representations into the queues."""
        if not self._pending:
            return
        if self._awaiting_backward:  # a graph that has not run its backward yet holds the current queue
            self.queue = self.queue.clone()
            self._awaiting_backward = False
        for representations, experts in self._pending:
            self._write(representations, experts)
        self._pending.clear()

    def _write(self, representations: Tensor, experts: Tensor) -> None:
        num_experts, size = self.filled.shape
        order = experts.argsort(stable=True)
        experts = experts[order]
        counts = torch.bincount(experts, minlength=num_experts)
        rank = torch.arange(len(experts), device=experts.device) - (counts.cumsum(0) - counts)[experts]
        # Written in arrival order, only the last `size` rows of each expert would survive.
        keep = rank >= counts[experts] - size
        slots = (self.position[experts] + rank) % size
        self.queue[experts[keep], slots[keep]] = representations[order][keep].to(self.queue)
        self.filled[experts[keep], slots[keep]] = True
        self.position.copy_((self.position + counts) % size)


def expert_contrastive_loss(queries: Tensor, active: Tensor, queue: ExpertMemoryQueue, temperature: float) -> Tensor:
    """InfoNCE between experts (SparseDoctor design, after CoMoE).

    queries: (S, k, d) normalised outputs of the experts active for S tokens; active: (S, k) those experts.
    For each token and active expert (the query), the other active experts' outputs are positives and the
    queued representations of the inactive experts are negatives.
    """
    tokens, k = active.shape
    if k < 2:
        raise ValueError("the contrastive loss needs top_k >= 2 (positives are the other active experts)")
    scaled = queries / temperature
    positive_logits = scaled @ queries.transpose(1, 2)  # (S, k, k)
    negative_logits = queue.negative_logits(scaled, active)  # (S, k, n Q)
    # Each (query, positive) pair is one InfoNCE term against all the query's negatives.
    off_diagonal = ~torch.eye(k, dtype=torch.bool, device=active.device)
    pairs = positive_logits[:, off_diagonal].view(tokens, k, k - 1)
    negative_mass = torch.logsumexp(negative_logits, -1, keepdim=True).expand_as(pairs)
    denominator = torch.logaddexp(pairs, negative_mass)
    return (denominator - pairs).mean()
