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
    copied first. An empty slot holds zeros (also after a load), which the contrastive loss relies on.
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
        self.register_load_state_dict_post_hook(lambda module, _: module._clear_empty_slots())

    def push(self, representations: Tensor, experts: Tensor, layers: list[int] | None = None) -> None:
        """Add representations (L', S, d) to the queues of their experts (L', S), oldest out first; `layers`
        names the L' layers (default: all, in order)."""
        self._pending.append((representations.detach(), experts, layers))

    def negatives(self, layers: list[int] | None = None) -> tuple[Tensor, Tensor]:
        """(L', n Q, d) every queued representation of the layers `layers` (as in `push`), expert by expert,
        and (L', n Q) whether its slot is filled. A tensor computed from them that holds them until its
        backward must be passed to `read_until_backward`."""
        self.flush()
        queue, filled = self.queue, self.filled
        if layers is not None and layers != list(range(len(queue))):  # some layers did not run: a copy
            queue, filled = queue[layers], filled[layers]
        return queue.flatten(1, 2), filled.flatten(1)

    def read_until_backward(self, tensor: Tensor) -> None:
        """Note that `tensor`'s backward reads the current queue: a push written before it copies the queue."""
        if tensor.requires_grad:
            self._reads_awaiting_backward += 1
            tensor.register_hook(self._backward_reached(self._generation))

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

    @torch.no_grad()
    def _clear_empty_slots(self) -> None:
        self.queue.masked_fill_(~self.filled.unsqueeze(-1), 0.0)

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
        counts = torch.bincount(queues, minlength=len(position))
        # each row's rank among its queue's rows, in arrival order
        order = queues.argsort(stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(queues), device=device) - (counts.cumsum(0) - counts)[queues[order]]
        slots = (position[queues] + rank) % size
        rows = representations.to(queue).flatten(0, 1)
        keep = rank >= counts[queues] - size  # written in arrival order, only the last `size` would survive
        if not keep.all():  # (rows are copied only if a queue overflows in one push)
            queues, slots, rows = queues[keep], slots[keep], rows[keep]
        queue[queues, slots] = rows
        filled[queues, slots] = True
        position.copy_((position + counts) % size)


def chosen_activations(hidden: Tensor, active: Tensor) -> Tensor:
    """(L, S, k, n r): for token s's j-th active expert e = active[s, j], the rank-space activations of all n
    experts with every block but e's zeroed, so that one product with all of B (d_out, n r) is B_e A_e x.
    hidden: (L, S, n, r); active: (L, S, k)."""
    mask = F.one_hot(active, hidden.shape[2]).unsqueeze(-1).to(hidden.dtype)
    return (hidden.unsqueeze(2) * mask).flatten(3)


class _OutputGram(torch.autograd.Function):
    """(L, S, k, k) the inner products of each token's k active-expert outputs o = c B^T, and the outputs
    (L, S, k, d_out) themselves (no gradient). The values come from the outputs; the gradient is taken in
    the rank space, through B^T B (n r x n r), so the backward touches no d_out-sized tensor."""

    @staticmethod
    def forward(ctx, chosen: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
        num_layers, tokens, k, _ = chosen.shape
        outputs = (chosen.flatten(1, 2) @ up.transpose(1, 2)).view(num_layers, tokens, k, -1)
        ctx.save_for_backward(chosen, up)
        ctx.mark_non_differentiable(outputs)
        ctx.set_materialize_grads(False)  # no zeros of the outputs' size for their (absent) gradient
        return outputs @ outputs.transpose(-1, -2), outputs

    @staticmethod
    def backward(ctx, grad: Tensor | None, _: None) -> tuple[Tensor | None, Tensor | None]:
        if grad is None:
            return None, None
        chosen, up = ctx.saved_tensors
        gram_up = up.transpose(1, 2) @ up  # (L, n r, n r)
        toward = grad @ chosen  # (L, S, k, n r)
        symmetric = toward + grad.transpose(-1, -2) @ chosen
        grad_chosen = (symmetric.flatten(1, 2) @ gram_up).view_as(chosen)
        grad_gram_up = chosen.flatten(1, 2).transpose(1, 2) @ toward.flatten(1, 2)
        return grad_chosen, up @ (grad_gram_up + grad_gram_up.transpose(1, 2))


EMPTY_LOGIT = -85.0  # an empty queue slot's shifted logit: its exponential is a normal float32, 1.2e-37
# On a CPU, exponentials are computed for this many bytes of layers at a time: a tensor above 32 MiB comes
# from the operating system fresh (its pages faulted in) at every step, one below it from reused memory.
EXPONENTIALS_CHUNK_BYTES = 16 * 2**20


class _NegativeLogSumExp(torch.autograd.Function):
    """(L, R) log sum_v exp(q . v / t) over the negatives v of each of R queries, with the query and the queued
    representations given in the rank space: `scaled` (L, R, n r) = c / (|o| t) and `projected` (L, n r, n Q)
    = B^T v for every queued v, queue by queue, so that q . v / t = scaled . projected. `included` (L, R, n):
    which experts' queues are the query's negatives (not its token's active experts); `filled` (L, n Q): slots
    that hold a representation. -inf where a query has no negative.

    One product of each layer's queries with all of its queued vectors, (R x n r) by (n r x n Q), shifted by
    the largest value q . v / t can take, 1/t (q and v are unit vectors), so that every exponential is a normal
    float32 (where 2/t < 50; else by the largest included value), then exp in place, the excluded queues' set
    to 0.0. An empty slot's logit is -85, not -inf: a CPU computes exp(-inf) at a third of the speed of a
    normal value, and underflowing values at a twentieth. Its exponential, 1.2e-37, is below the float32
    resolution of any sum with one filled slot (each at least exp(-2/t) > 1.9e-22). The backward applies each
    query's weight to the products' small results (R x n r, its queries), never to the exponentials.
    """

    @staticmethod
    def forward(ctx, scaled: Tensor, projected: Tensor, included: Tensor, filled: Tensor, temperature: float) -> Tensor:
        num_layers, rows, _ = scaled.shape
        num_experts = included.shape[-1]
        bounded = 2 / temperature < 50
        if bounded:
            offset = torch.where(filled, -1 / temperature, EMPTY_LOGIT)
        else:
            offset = torch.where(filled, 0.0, float("-inf"))
        offset = offset.unsqueeze(1).to(projected.dtype)
        has_negative = (included & filled.view(num_layers, 1, num_experts, -1).any(-1)).any(-1)
        shift = torch.full((num_layers, rows), 1 / temperature, device=scaled.device)
        total = scaled.new_empty(num_layers, rows)
        chunks = _layer_chunks(num_layers, rows * projected.shape[-1] * projected.element_size(), scaled.device)
        saved = []
        for part in chunks:
            logits = torch.baddbmm(offset[part], scaled[part], projected[part])  # (L', R, n Q)
            by_queue = logits.unflatten(-1, (num_experts, -1))
            if not bounded:
                largest = by_queue.amax(-1).masked_fill(~included[part], float("-inf")).amax(-1)
                shift[part] = torch.where(has_negative[part], largest, 0.0)
                logits.sub_(shift[part].unsqueeze(-1)).clamp_max_(0.0)  # excluded queues' larger values
            logits.exp_()
            by_queue.mul_(included[part].unsqueeze(-1))
            torch.sum(logits, -1, out=total[part])
            saved.append(logits)
        total = torch.where(has_negative, total, 0.0)
        ctx.chunks = chunks
        ctx.save_for_backward(scaled, projected, total, *saved)
        return total.log() + shift

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        scaled, projected, total, *exponentials = ctx.saved_tensors
        # (L, R, 1): d loss / d exp(logit) of each query's negatives; 0 where it has none
        weight = torch.where(total > 0, grad / total, 0.0).unsqueeze(-1)
        weighted = scaled * weight
        grad_scaled, grad_projected = torch.empty_like(scaled), torch.empty_like(projected)
        for part, values in zip(ctx.chunks, exponentials, strict=True):
            torch.bmm(values, projected[part].transpose(1, 2), out=grad_scaled[part])  # an empty slot's v is 0
            torch.bmm(weighted[part].transpose(1, 2), values, out=grad_projected[part])  # meets it as 0 in B
        return grad_scaled.mul_(weight), grad_projected, None, None, None


def _layer_chunks(num_layers: int, bytes_per_layer: int, device: torch.device) -> list[slice]:
    """Slices of at most EXPONENTIALS_CHUNK_BYTES of layers (at least one layer each) on a CPU; all layers at
    once elsewhere (a GPU's caching allocator reuses its memory)."""
    if device.type != "cpu":
        return [slice(0, num_layers)]
    step = max(1, EXPONENTIALS_CHUNK_BYTES // bytes_per_layer)
    return [slice(start, start + step) for start in range(0, num_layers, step)]


def expert_contrastive_loss(
    hidden: Tensor,
    active: Tensor,
    up: Tensor,
    queue: ExpertMemoryQueue,
    temperature: float,
    layers: list[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """(L,) InfoNCE between experts (SparseDoctor design, after CoMoE), one loss per layer, and the queries
    (L, S, k, d_out), detached, for the queue.

    hidden: (L, S, n, r) rank-space activations A_i x of every expert for S tokens in L layers; active:
    (L, S, k) the tokens' active experts; up: (L, d_out, n r) each layer's B as one matrix; `layers`: which
    of the queue's layers they are (default: all). The queries are the normalised outputs q = B_e A_e x /
    |B_e A_e x| of each token's active experts e. For each query, the token's other queries are positives and
    the queued representations of the inactive experts are negatives: loss = -log(exp(q.p/t) / (exp(q.p/t) +
    sum_v exp(q.v/t))) per (query, positive) pair.

    Computed in float32, in the experts' rank space (n r, against S k queries and d_out): q . v =
    (c . B^T v) / |o| with c the query's masked activations (`chosen_activations`), so the queue meets B once,
    (n Q x d_out) x (d_out x n r), not every query.
    """
    num_layers, tokens, k = active.shape
    if k < 2:
        raise ValueError("the contrastive loss needs top_k >= 2 (positives are the other active experts)")
    with torch.autocast(hidden.device.type, enabled=False):
        hidden, up = hidden.float(), up.float()
        chosen = chosen_activations(hidden, active)
        gram, outputs = _OutputGram.apply(chosen, up)
        norms = gram.diagonal(dim1=-2, dim2=-1).clamp_min(1e-24).sqrt()  # as F.normalize: max(|o|, 1e-12)
        cosines = gram / (norms.unsqueeze(-1) * norms.unsqueeze(-2))
        off_diagonal = ~torch.eye(k, dtype=torch.bool, device=active.device)
        pairs = cosines[..., off_diagonal].view(num_layers, tokens, k, k - 1) / temperature
        vectors, filled = queue.negatives(layers)
        projected = up.transpose(1, 2) @ vectors.float().transpose(1, 2)  # (L, n r, n Q)
        queue.read_until_backward(projected)
        scaled = (chosen / (norms.unsqueeze(-1) * temperature)).flatten(1, 2)
        included = torch.ones(num_layers, tokens, hidden.shape[2], dtype=torch.bool, device=hidden.device)
        included = included.scatter_(2, active, False).unsqueeze(2).expand(-1, -1, k, -1).flatten(1, 2)
        negative_mass = _NegativeLogSumExp.apply(scaled, projected, included, filled, temperature)
        negative_mass = negative_mass.view(num_layers, tokens, k, 1).expand_as(pairs)
        losses = (torch.logaddexp(pairs, negative_mass) - pairs).mean((1, 2, 3))
        queries = outputs.div_(norms.detach().unsqueeze(-1))  # outputs: computed for the queue, not saved
    return losses, queries
