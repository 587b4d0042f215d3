"""The router interface, its registry, the Routing result and the per-forward routing context."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn

from loramix.call import CallState, RowState
from loramix.losses import selection_log_prob

ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str):
    """Class decorator: make a Router subclass available as `MixLoraConfig(router=name)`."""

    def add(cls: type[Router]) -> type[Router]:
        if name in ROUTERS:
            raise ValueError(f"a router named {name!r} is already registered ({ROUTERS[name].__name__})")
        ROUTERS[name] = cls
        cls.name = name
        return cls

    return add


@dataclass
class Routing:
    """One routing decision for a batch; T' is the token count, or 1 when routed once per sequence.

    weights:  (B, T', n) combination weights of the experts, zero for inactive ones.
    probs:    (B, T', n) the router's distribution (load balance, statistics), if it has one.
    logits:   (B, T', n) pre-softmax scores (z-loss), if any.
    indices:  (B, T', k) the active experts for sparse routers, best first (in the order drawn if sampled).
    sampled:  whether `indices` were drawn from softmax(logits) (ReMix in training); `log_prob` is then their
              log-probability.
    """

    weights: Tensor
    probs: Tensor | None = None
    logits: Tensor | None = None
    indices: Tensor | None = None
    sampled: bool = False

    @property
    def log_prob(self) -> Tensor | None:
        """(B, T') log-probability of the sampled selection, None if the experts were not sampled."""
        return selection_log_prob(self.logits.log_softmax(-1), self.indices) if self.sampled else None

    def expert_share(self) -> Tensor:
        """(B, T', n) each expert's share of a token: 1/k per active expert, or the dense weight share."""
        if self.indices is not None:
            share = torch.zeros_like(self.weights)
            return share.scatter_(-1, self.indices, 1.0 / self.indices.shape[-1])
        return self.weights / self.weights.sum(-1, keepdim=True).clamp_min(1e-12)


@dataclass
class RoutingRecord:
    """What one routing decision leaves behind for the losses: the routing and its (B, T') token mask."""

    router: Router
    routing: Routing
    mask: Tensor

    def key(self, names: tuple[str, ...]) -> tuple:
        """Records with equal keys can stack their Routing fields `names` into one tensor each (every token-level
        router of a forward has the same key)."""
        values = (getattr(self.routing, name) for name in names)
        return (*((v.shape, v.dtype) if v is not None else None for v in values), self.mask.shape)

    def detached(self) -> RoutingRecord:
        """The same record cut from the autograd graph (for statistics once the loss has been built)."""
        values = {f.name: getattr(self.routing, f.name) for f in fields(Routing)}
        routing = Routing(**{k: v.detach() if isinstance(v, Tensor) else v for k, v in values.items()})
        return RoutingRecord(self.router, routing, self.mask)


@dataclass
class StackedRecords:
    """Records of equal shapes stacked: the Routing fields asked for and the mask, each with a leading router
    dimension R (`tensors[name]` is None where the records have no such field)."""

    routers: list[Router]
    tensors: dict[str, Tensor | None]
    mask: Tensor

    @classmethod
    def of(cls, records: list[RoutingRecord], names: tuple[str, ...]) -> StackedRecords:
        stacked = {}
        for name in names:
            tensors = [getattr(r.routing, name) for r in records]
            stacked[name] = None if tensors[0] is None else torch.stack(tensors)
        return cls([r.router for r in records], stacked, torch.stack([r.mask for r in records]))

    @torch.no_grad()
    def add_to_router_stats(self) -> None:
        """Add this routing to each router's statistics (expert load, ESS of the weights and of the router's
        distribution, token count); needs the fields weights, indices and probs."""
        routing = Routing(self.tensors["weights"], indices=self.tensors["indices"])
        weight = self.mask.unsqueeze(-1).to(routing.weights.dtype)
        loads = (routing.expert_share() * weight).sum((1, 2)).float()
        ess = (effective_support_size(routing.weights) * weight[..., 0]).sum((1, 2)).float()
        counts = self.mask.sum((1, 2)).float()
        added = [("stat_load", loads), ("stat_ess", ess), ("stat_count", counts)]
        probs = self.tensors["probs"]
        if probs is not None:
            added.append(("stat_probs_ess", (effective_support_size(probs) * weight[..., 0]).sum((1, 2)).float()))
        for name, values in added:
            torch._foreach_add_([getattr(router, name) for router in self.routers], list(values.unbind()))


@dataclass
class ExpertSample:
    """Rank-space expert activations of a few tokens of one layer, kept for the contrastive loss.

    hidden: (S, n, r) A_i x for every expert i of S sampled tokens; active: (S, k) their active experts;
    up: (d_out, n r) the layer's B as one matrix, as the forward used it.
    """

    layer: nn.Module
    hidden: Tensor
    active: Tensor
    up: Tensor


@dataclass
class BlockInput:
    """The hidden states entering one decoder block in this forward (for the prompt routers)."""

    hidden: Tensor | None = None


def capture_block_input(block: nn.Module, args: tuple, kwargs: dict) -> None:
    """A decoder block's forward pre-hook: keep its input in the block's `loramix_block_input`. One function
    for every block, reading nothing block-specific, so that compiled blocks share one graph."""
    block.loramix_block_input.hidden = args[0] if args else kwargs["hidden_states"]


@dataclass
class RoutingContext(CallState):
    """State shared by the routers of one wrapped model during one forward (or one `generate`) call."""

    row_fields = (*CallState.row_fields, "sequence_routes")
    sequence_routes: dict[str, Routing] = field(default_factory=dict)  # routes taken once per sequence
    layer_cache: dict[nn.Module, tuple] = field(default_factory=dict)  # per layer, for one `generate` call
    records: list[RoutingRecord] = field(default_factory=list)  # this forward's, collected when it ends
    expert_samples: list[ExpertSample] = field(default_factory=list)
    # What a forward leaves on its modules: each router's `step_route` and `last_record`, each contrastive
    # layer's `contrast_sample`, each decoder block's input for the prompt routers. Attributes, not entries of
    # one list or dict, so that a compiled decoder block depends on no layer's name or position and every
    # block runs the same graph.
    routers: list[nn.Module] = field(default_factory=list)
    contrastive_layers: list[nn.Module] = field(default_factory=list)
    block_inputs: list[BlockInput] = field(default_factory=list)
    sampled_tokens: list[tuple[tuple[int, ...], Tensor]] = field(default_factory=list)  # for the contrastive loss

    def new_forward(self, attention_mask: Tensor | None) -> None:
        """Forget what the previous forward routed; keep what `generate` caches across steps."""
        super().new_forward(attention_mask)
        self.records.clear()
        self.expert_samples.clear()
        self.sampled_tokens.clear()
        for router in self.routers:
            router.step_route = router.last_record = None
        for block_input in self.block_inputs:
            block_input.hidden = None
        for layer in self.contrastive_layers:
            layer.contrast_sample = None

    def collect(self) -> None:
        """Gather what the forward's routers and contrastive layers left behind into `records` and
        `expert_samples` (in the order of the model's layers)."""
        self.records[:] = [router.last_record for router in self.routers if router.last_record is not None]
        samples = (layer.contrast_sample for layer in self.contrastive_layers)
        self.expert_samples[:] = [sample for sample in samples if sample is not None]

    def start_call(self, task_ids: Tensor | None, prompt_mask: Tensor | None, generating: bool) -> None:
        super().start_call(task_ids, prompt_mask, generating)
        self.sequence_routes.clear()
        self.layer_cache.clear()

    def resume(self, state: RowState) -> None:
        super().resume(state)
        self.layer_cache.clear()  # the gates kept for the previous rows

    def stacked_records(self, records: list[RoutingRecord], *names: str) -> list[StackedRecords]:
        """The Routing fields `names` and the masks of `records`, stacked per group of equal shapes, so that
        losses and statistics over many routers cost a few tensor operations, not a few per router."""
        groups: dict[tuple, list[RoutingRecord]] = {}
        for record in records:
            groups.setdefault(record.key(names), []).append(record)
        return [StackedRecords.of(group, names) for group in groups.values()]

    def contrast_tokens(self, x: Tensor, count: int) -> Tensor:
        """Flat indices into the (B T) tokens of x of up to `count` random real tokens, drawn once per forward
        and token shape: the layers that see the same tokens use the same draw, so their losses stack. (A list
        searched by shape, not a dict keyed by it, so that compiled blocks keep sequence lengths dynamic.)"""
        shape = tuple(x.shape[:2])
        for drawn_shape, picks in self.sampled_tokens:
            if drawn_shape == shape:
                return picks
        mask = self.token_mask(x).flatten()
        picks = (torch.rand(mask.shape, device=mask.device) + mask).topk(min(count, mask.numel())).indices
        picks = picks[mask[picks]]
        self.sampled_tokens.append((shape, picks))
        return picks


POOLINGS = ("attention", "mean", "last")  # the modes of PromptPooling


class PromptPooling(nn.Module):
    """Pools (B, T, d) hidden states over the prompt tokens into (B, 1, d): attention, mean or last."""

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        # Zero init: attention pooling starts as the mean.
        self.score = nn.Parameter(torch.zeros(dim)) if mode == "attention" else None

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        if self.mode == "last":
            positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
            last = torch.where(mask, positions, -1).argmax(-1)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].unsqueeze(1)
        if self.mode == "mean":
            attention = mask.to(hidden.dtype) / mask.sum(-1, keepdim=True).clamp_min(1).to(hidden.dtype)
        else:
            scores = (hidden.float() @ self.score.float()).masked_fill(~mask, float("-inf"))
            attention = scores.softmax(-1).to(hidden.dtype)
        return (attention.unsqueeze(1) @ hidden).to(hidden.dtype)


class Router(nn.Module, ABC):
    """Chooses expert weights for the inputs of an adapted layer.

    Subclasses implement `forward(x, context) -> Routing` for x of shape (B, T, d); `route` adds what every
    router shares: routing once per sequence, reusing a route across decoding steps, statistics. A router is
    built from its mixture's MixLoraConfig (`config`), whose fields it reads.
    """

    name = "router"
    balance_loss = False  # does the Switch load-balance loss apply to this router?

    def __init__(self, config, in_features: int, num_experts: int, key: str) -> None:
        super().__init__()
        self.key = key
        # this forward's Routing, for every layer that shares this router, and its record for the losses
        self.step_route: Routing | None = None
        self.last_record: RoutingRecord | None = None
        self.num_experts = num_experts
        self.top_k = min(config.top_k, num_experts)
        self.expert_scale = config.alpha / config.expert_rank
        self.sequence_level = config.routing_level == "sequence"
        self.pool = PromptPooling(in_features, config.prompt_pooling) if self.sequence_level else None
        self.register_buffer("stat_load", torch.zeros(num_experts), persistent=False)
        self.register_buffer("stat_ess", torch.zeros(()), persistent=False)
        self.register_buffer("stat_count", torch.zeros(()), persistent=False)
        self.register_buffer("stat_probs_ess", torch.zeros(()), persistent=False)

    @abstractmethod
    def forward(self, x: Tensor, context: RoutingContext) -> Routing:
        """The Routing of x, (B, T, d) hidden states."""

    def routing_input(self, x: Tensor, context: RoutingContext) -> Tensor:
        """The hidden states this router decides from (the adapted layer's input by default)."""
        return x

    def route(self, x: Tensor, context: RoutingContext) -> Routing:
        """The Routing for this forward, computed once and shared by every layer that uses this router."""
        routing = self.step_route
        if routing is not None:
            return routing
        if self.sequence_level:
            routing = context.sequence_routes.get(self.key) if context.generating else None
            if routing is None:
                hidden = self.routing_input(x, context)
                routing = self(self.pool(hidden, context.pooling_mask(hidden)), context)
                self.record(routing, torch.ones(hidden.shape[0], 1, dtype=torch.bool, device=x.device))
                if context.generating:
                    context.sequence_routes[self.key] = routing
        else:
            hidden = self.routing_input(x, context)
            routing = self(hidden, context)
            mask = (
                context.token_mask(hidden)
                if routing.weights.shape[1] > 1
                else hidden.new_ones(hidden.shape[0], 1, dtype=torch.bool)
            )
            self.record(routing, mask)
        self.step_route = routing
        return routing

    def record(self, routing: Routing, mask: Tensor) -> None:
        """Keep the routing for this step's auxiliary losses and statistics (added once the forward ends)."""
        self.last_record = RoutingRecord(self, routing, mask)

    def active_parameters(self) -> int:
        """How many of this router's parameters one token uses."""
        return sum(p.numel() for p in self.parameters())

    def reset_stats(self) -> None:
        self.stat_load.zero_()
        self.stat_ess.zero_()
        self.stat_count.zero_()
        self.stat_probs_ess.zero_()

    def stats(self) -> dict:
        """{"load": share of routed tokens per expert, "ess": mean ESS of the routing weights, "probs_ess": mean
        ESS of the router's distribution over all experts (routers that have one)}."""
        count = self.stat_count.clamp_min(1)
        total = self.stat_load.sum().clamp_min(1e-12)
        stats = {"load": (self.stat_load / total).tolist(), "ess": float(self.stat_ess / count)}
        if self.stat_probs_ess > 0:
            stats["probs_ess"] = float(self.stat_probs_ess / count)
        return stats


def effective_support_size(weights: Tensor) -> Tensor:
    """ESS = (sum_i w_i)^2 / sum_i w_i^2 over the last dimension: 1 for one expert, n for uniform."""
    return weights.sum(-1).square() / weights.square().sum(-1).clamp_min(1e-24)
