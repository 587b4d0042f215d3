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


def selection_log_prob(log_probs: Tensor, indices: Tensor) -> Tensor:
    """log Q(I) = sum_j [log q_{i_j} - log(1 - sum_{j' < j} q_{i_j'})] for ordered draws I without replacement."""
    chosen = log_probs.gather(-1, indices)
    probs = chosen.exp()
    before = probs.cumsum(-1) - probs
    return (chosen - torch.log1p(-before.clamp(max=1 - 1e-6))).sum(-1)


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
    """Per-expert FIFO queues of detached, normalised expert representations from earlier batches, for L
    layers of equal output size at once: (L, n experts, Q slots, d).

    A push is written when the queue is next read (or saved), not at once: the loss that read the queue in
    this step needs its contents until its backward, and writing after it spares copying every queue in
    every step. Should a push (or a load) be written while such a backward is still to come, the queue is
    copied first.
    """

    def __init__(self, num_layers: int, num_experts: int, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("queue", torch.zeros(num_layers, num_experts, size, dim))
        self.register_buffer("filled", torch.zeros(num_layers, num_experts, size, dtype=torch.bool))
        self.register_buffer("position", torch.zeros(num_layers, num_experts, dtype=torch.long))
        self._pending: list[tuple[Tensor, Tensor, list[int] | None]] = []
        self._reads_awaiting_backward = 0  # of the current queue tensor; a copy starts a new generation
        self._generation = 0
        self.register_state_dict_pre_hook(lambda module, prefix, keep_vars: module.flush())
        self.register_load_state_dict_pre_hook(lambda module, *args: module._before_load())

    def push(self, representations: Tensor, experts: Tensor, layers: list[int] | None = None) -> None:
        """Add representations (L', S, d) to the queues of their experts (L', S), oldest out first; `layers`
        names the L' layers (default: all, in order)."""
        self._pending.append((representations.detach(), experts, layers))

    def negative_logits(self, queries: Tensor, active: Tensor, layers: list[int] | None = None) -> Tensor:
        """(L', S, k, n Q) dot products of queries (L', S, k, d) with every queued representation of their
        layer; -inf for empty slots and for the queues of the token's active experts (L', S, k), which are not
        its negatives. `layers` as in `push`."""
        self.flush()
        queue, filled = self.queue, self.filled
        if layers is not None and layers != list(range(len(queue))):  # some layers did not run: a copy
            queue, filled = queue[layers], filled[layers]
        num_layers, tokens, k, _ = queries.shape
        num_experts = filled.shape[1]
        logits = queries.flatten(1, 2) @ queue.flatten(1, 2).to(queries.dtype).transpose(1, 2)
        logits = logits.view(num_layers, tokens, k, num_experts, -1)
        is_active = torch.zeros(num_layers, tokens, num_experts, dtype=torch.bool, device=active.device)
        is_active.scatter_(2, active, True)
        unusable = is_active[:, :, None, :, None] | ~filled[:, None, None]
        logits = logits.masked_fill_(unusable, float("-inf")).flatten(3)
        if logits.requires_grad:
            self._reads_awaiting_backward += 1
            logits.register_hook(self._backward_reached(self._generation))
        return logits

    def _backward_reached(self, generation: int):
        def hook(grad: Tensor) -> None:
            if generation == self._generation:
                self._reads_awaiting_backward -= 1

        return hook

    def _copy_if_read(self) -> None:
        """Give the queue a new tensor if a graph that has not run its backward yet holds the current one."""
        if self._reads_awaiting_backward:
            self.queue = self.queue.clone()
            self._reads_awaiting_backward, self._generation = 0, self._generation + 1

    def _before_load(self) -> None:
        self._pending.clear()
        self._copy_if_read()

    @torch.no_grad()
    def flush(self) -> None:
        """Write the pushed representations into the queues."""
        if not self._pending:
            return
        self._copy_if_read()
        for pending in self._pending:
            self._write(*pending)
        self._pending.clear()

    def _write(self, representations: Tensor, experts: Tensor, layers: list[int] | None) -> None:
        num_layers, num_experts, size, dim = self.queue.shape
        device = self.queue.device  # the module may have moved since the push
        layer = torch.tensor(layers if layers is not None else range(num_layers), device=device)
        # Each (layer, expert) queue is one row of the flattened buffers.
        queues = (layer[:, None] * num_experts + experts.to(device)).flatten()
        queue, filled, position = self.queue.view(-1, size, dim), self.filled.view(-1, size), self.position.view(-1)
        order = queues.argsort(stable=True)
        queues = queues[order]
        counts = torch.bincount(queues, minlength=len(position))
        rank = torch.arange(len(queues), device=queues.device) - (counts.cumsum(0) - counts)[queues]
        # Written in arrival order, only the last `size` rows of each queue would survive.
        keep = rank >= counts[queues] - size
        slots = (position[queues] + rank) % size
        queue[queues[keep], slots[keep]] = representations.to(queue).flatten(0, 1)[order][keep]
        filled[queues[keep], slots[keep]] = True
        position.copy_((position + counts) % size)


def expert_contrastive_loss(
    queries: Tensor, active: Tensor, queue: ExpertMemoryQueue, temperature: float, layers: list[int] | None = None
) -> Tensor:
    """(L,) InfoNCE between experts (SparseDoctor design, after CoMoE), one loss per layer.

    queries: (L, S, k, d) normalised outputs of the experts active for S tokens in L layers; active: (L, S, k)
    those experts; `layers`: which of the queue's layers they are (default: all). For each token and active
    expert (the query), the other active experts' outputs are positives and the queued representations of
    the inactive experts are negatives.
    """
    num_layers, tokens, k = active.shape
    if k < 2:
        raise ValueError("the contrastive loss needs top_k >= 2 (positives are the other active experts)")
    scaled = queries / temperature
    # In the queries' precision: under autocast the products would also copy the whole queue to cast it.
    with torch.autocast(queries.device.type, enabled=False):
        positive_logits = scaled @ queries.transpose(-1, -2)  # (L, S, k, k)
        negative_logits = queue.negative_logits(scaled, active, layers)  # (L, S, k, n Q)
    # Each (query, positive) pair is one InfoNCE term against all the query's negatives.
    off_diagonal = ~torch.eye(k, dtype=torch.bool, device=active.device)
    pairs = positive_logits[..., off_diagonal].view(num_layers, tokens, k, k - 1)
    negative_mass = torch.logsumexp(negative_logits, -1, keepdim=True).expand_as(pairs)
    return (torch.logaddexp(pairs, negative_mass) - pairs).mean((1, 2, 3))
