"""`alora`: allocating low-rank adaptation (ALoRA, arXiv 2403.16187).

A LoRA whose ranks move between modules during training. Each adapted linear layer holds `max_rank` rank slots,
y = W0 x + s B (g * A x) with s = alpha / rank and a gate g per slot (1: active, 0: pruned or unused); every
module starts with `rank` active slots and B = 0, so a freshly wrapped model computes what the base model does.

Every `allocate_every` optimizer steps (for `allocation_rounds` rounds) AB-LoRA scores each active rank by
ablation: its importance is the held-out loss with the rank masked minus the loss with every active rank. The
`prune_per_round` least important ranks are switched off, and as many unused slots are switched on in the
modules whose remaining ranks score highest (on average), one per module in that order: the number of active
ranks stays fixed. A module keeps at least one rank (its best), so that it is still scored and can grow again;
a module pruned in a round grows in it only when no other module has a free slot. A grown slot gets a fresh A
and B = 0 (the model's outputs do not change) and its optimizer state is zeroed, as is a pruned slot's. One
forward scores many ablations at once: the held-out batch is repeated along the batch dimension (from the
first adapted decoder block on, the blocks below computing the same for every replica), each replica with its
own gates. The gates and the allocation log are buffers of the adapter: saved, loaded and resumed with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from loramix.methods.base import AdaptedModel, MethodConfig, register_method
from loramix.targets import decoder_layer_of, find_targets, linear_features, replace_module

ABLATION_ROWS = 64  # batch rows of one scoring forward: a held-out batch of b rows scores 64 // b ablations at once
MIN_RANKS = 1  # active ranks a module keeps whatever its scores


@dataclass
class AloraConfig(MethodConfig):
    """Settings of an ALoRA adapter."""

    target_modules: list[str] | str = field(
        default="all-linear",
        metadata={"help": "Suffixes of the linear layers to adapt, or 'all-linear' (all but the output head)."},
    )
    layers_to_transform: list[int] | None = field(
        default=None, metadata={"help": "Indices of the decoder layers to adapt, e.g. the upper half; None: all."}
    )
    rank: int = field(default=8, metadata={"help": "Active ranks of every module at the start."})
    max_rank: int = field(default=16, metadata={"help": "Rank slots of every module: the most ranks it can grow to."})
    alpha: float = field(default=16.0, metadata={"help": "Scaling numerator: the update is alpha / rank * B g A x."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    allocate_every: int = field(default=100, metadata={"help": "Optimizer steps between two allocation rounds."})
    allocation_rounds: int = field(default=3, metadata={"help": "Allocation rounds (0: a fixed-rank LoRA)."})
    prune_per_round: int = field(default=8, metadata={"help": "Ranks moved per round (pruned, then regrown)."})
    score_examples: int | None = field(
        default=None,
        metadata={"help": "Held-out examples a round scores on, taken in turn (tasks alternating); None: all."},
    )

    def __post_init__(self) -> None:
        self._check_targets()
        self._check_integers(("rank", "max_rank", "allocate_every", "prune_per_round"))
        self._check_integers(("allocation_rounds",), minimum=0)
        if self.max_rank < self.rank:
            self._fail("max_rank", self.max_rank, f"expected an integer >= rank={self.rank}")
        if self.allocation_rounds and self.max_rank == self.rank:
            self._fail(
                "max_rank",
                self.max_rank,
                f"expected > rank={self.rank}, so that modules have slots to grow into (or allocation_rounds: 0)",
            )
        self._check_numbers(("alpha",), strict=True)
        if isinstance(self.dropout, bool) or not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            self._fail("dropout", self.dropout, "expected 0 <= dropout < 1")
        if self.score_examples is not None:
            self._check_integers(("score_examples",))

    def card_details(self) -> tuple[tuple[str, str], dict[str, str]]:
        method = ("ALoRA, allocating low-rank adaptation (AB-LoRA)", "arXiv 2403.16187")
        targets = self.target_modules if isinstance(self.target_modules, str) else ", ".join(self.target_modules)
        layers = "all" if self.layers_to_transform is None else ", ".join(map(str, self.layers_to_transform))
        rounds = self.allocation_rounds
        allocation = (
            f"{rounds} rounds, one every {self.allocate_every} steps, moving {self.prune_per_round} ranks each"
            if rounds
            else "none (fixed ranks)"
        )
        return method, {
            "adapted modules": targets,
            "layers": layers,
            "rank": f"{self.rank} per module at the start, at most {self.max_rank}",
            "alpha": str(self.alpha),
            "rank allocation": allocation,
        }


class AloraLinear(nn.Module):
    """y = W0 x + scale * B (g * A x) over `max_rank` rank slots with gates g (1: active, 0: off).

    A: (max_rank, d_in), B: (d_out, max_rank), starting at zero. While `row_gates` (rows, max_rank) is set,
    row i of the batch uses gates row_gates[i] instead (to score several ablations in one forward).
    """

    def __init__(self, base_layer: nn.Module, config: AloraConfig, in_features: int, out_features: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(config.max_rank, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.max_rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        gates = (torch.arange(config.max_rank, device=device) < config.rank).float()
        self.register_buffer("rank_gates", gates)
        self.scale = config.alpha / config.rank
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.row_gates: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        hidden = F.linear(self.dropout(x), self.lora_A.to(x.dtype))
        if self.row_gates is None:
            gates = self.rank_gates
        else:
            gates = self.row_gates.view(len(self.row_gates), *[1] * (hidden.dim() - 2), -1)
        update = F.linear(hidden * gates.to(hidden.dtype), self.lora_B.to(hidden.dtype))
        return result + (self.scale * update).to(result.dtype)

    def active_ranks(self) -> int:
        return int(self.rank_gates.count_nonzero())

    @torch.no_grad()
    def grow(self, slot: int, generator: torch.Generator) -> None:
        """Switch slot `slot` on with a fresh A row (LoRA's initialisation) and B column 0."""
        fresh = torch.empty(1, self.in_features)
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
        self.lora_A[slot] = fresh[0].to(self.lora_A.device)
        self.lora_B[:, slot] = 0
        self.rank_gates[slot] = 1

    def extra_repr(self) -> str:
        return f"active={self.active_ranks()}/{len(self.rank_gates)}, in={self.in_features}, out={self.out_features}"


@register_method("alora", AloraConfig)
class AloraModel(AdaptedModel):
    """A frozen causal LM whose target linear layers are AloraLinear; ranks move between them during training."""

    needs_held_out = True

    def __init__(self, model: nn.Module, config: AloraConfig) -> None:
        super().__init__(model, config)
        self.layers: dict[str, AloraLinear] = {}
        for name in find_targets(model, config.target_modules, config.layers_to_transform):
            base = model.get_submodule(name)
            self.layers[name] = AloraLinear(base, config, *linear_features(base))
            replace_module(model, name, self.layers[name])
        device = next(iter(self.layers.values())).lora_A.device
        # one row per round: [its step, the pruned slots, the grown ones], slots as module index * max_rank + slot
        log = torch.full((config.allocation_rounds, 1 + 2 * config.prune_per_round), -1, dtype=torch.long)
        self.register_buffer("allocation_log", log.to(device))
        # the numbered decoder block of each module, from which ablation replicas run (None: from the inputs)
        try:
            blocks = [decoder_layer_of(name).rsplit(".", 1) for name in self.layers]
        except ValueError:  # a module outside the numbered blocks
            blocks = []
        self._blocks = (
            [prefix + "." + number for prefix, number in blocks] if len({p for p, _ in blocks}) == 1 else None
        )

    # ---- allocation ---------------------------------------------------------------------------------------
    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer, held_out: Callable | None) -> None:
        """An allocation round after every `allocate_every`-th step, for the first `allocation_rounds` rounds."""
        config = self.method_config
        round_number = step // config.allocate_every
        if step % config.allocate_every or not 1 <= round_number <= config.allocation_rounds:
            return
        if held_out is None:
            raise ValueError("ALoRA scores its ranks on held-out batches: training must give them (dev_examples >= 1)")
        batches = held_out()
        if config.score_examples is not None:
            batches = held_out_examples(batches, config.score_examples, (round_number - 1) * config.score_examples)
        self.allocate(self.rank_importance(batches), optimizer, step)

    def _active_slots(self) -> list[tuple[int, int]]:
        return [
            (module, slot)
            for module, layer in enumerate(self.layers.values())
            for slot in layer.rank_gates.nonzero()[:, 0].tolist()
        ]

    @torch.no_grad()
    def rank_importance(self, batches: list[dict[str, Tensor]]) -> Tensor:
        """(modules, max_rank) the importance of each active rank (NaN for slots that are off): the mean
        cross-entropy over the batches' labelled tokens with the rank masked, minus the one with no rank masked.
        Scored in eval mode; the training mode is restored after."""
        layers = list(self.layers.values())
        replicas = [None, *self._active_slots()]  # replica 0 masks nothing
        sums = torch.zeros(len(replicas), dtype=torch.float64)
        tokens = 0
        training = self.training
        self.eval()
        try:
            for batch in batches:
                rows = len(batch["input_ids"])
                count = max(1, ABLATION_ROWS // rows)
                for start in range(0, len(replicas), count):
                    chunk = replicas[start : start + count]
                    losses, row_of = self._ablated_losses(batch, layers, chunk)
                    per_row = torch.zeros(len(chunk) * rows, dtype=torch.float64, device=losses.device)
                    per_row.index_add_(0, row_of, losses.double())
                    sums[start : start + len(chunk)] += per_row.view(len(chunk), rows).sum(1).cpu()
                tokens += len(losses) // len(chunk)
        finally:
            for layer in layers:
                layer.row_gates = None
            self.train(training)
        means = sums / max(tokens, 1)
        scores = torch.full((len(layers), self.method_config.max_rank), math.nan)
        for (module, slot), masked in zip(replicas[1:], means[1:].tolist(), strict=True):
            scores[module, slot] = masked - means[0].item()
        if dist.is_available() and dist.is_initialized():  # every process applies the same allocation
            on_device = scores.to(layers[0].lora_A.device)
            dist.broadcast(on_device, 0)
            scores = on_device.cpu()
        return scores

    def _ablated_losses(
        self, batch: dict[str, Tensor], layers: list[AloraLinear], chunk: list[tuple[int, int] | None]
    ) -> tuple[Tensor, Tensor]:
        """`labelled_token_losses` of the batch repeated once per entry of `chunk`, replica j with the slot
        chunk[j] = (module, slot) masked (None: nothing)."""
        rows = len(batch["input_ids"])
        gates: dict[int, Tensor] = {}
        for replica, masked in enumerate(chunk):
            if masked is not None:
                module, slot = masked
                if module not in gates:
                    gates[module] = layers[module].rank_gates.expand(len(chunk), -1).clone()
                gates[module][replica, slot] = 0
        for module, layer in enumerate(layers):
            layer.row_gates = gates[module].repeat_interleave(rows, 0) if module in gates else None
        repeated = None
        masked_modules = [entry[0] for entry in chunk if entry is not None]
        if self._blocks is not None and masked_modules:  # replicas are ordered by block: the first is the lowest
            block = self._blocks[masked_modules[0]]
            repeated = lambda: self._repeated_from(block, len(chunk), rows)  # noqa: E731
        return self.labelled_token_losses(batch, len(chunk), repeated)

    @torch.no_grad()
    def allocate(self, scores: Tensor, optimizer: torch.optim.Optimizer | None = None, step: int = 0) -> dict:
        """One allocation round from `rank_importance`'s scores: prune the `prune_per_round` lowest-scored
        active ranks (a module keeping MIN_RANKS), grow as many slots in the best-scored modules, zero those
        slots' optimizer state; log it and return {"step", "pruned", "grown"} as [module name, slot] pairs."""
        config = self.method_config
        open_rows = (self.allocation_log[:, 0] < 0).nonzero()[:, 0].tolist()
        if not open_rows:
            raise ValueError(f"all {config.allocation_rounds} allocation rounds (allocation_rounds) are done")
        row = open_rows[0]
        layers = list(self.layers.values())
        active = torch.stack([layer.rank_gates for layer in layers]).cpu() > 0
        kept = active.sum(1).tolist()
        pruned = []
        for module, slot in sorted(self._active_slots(), key=lambda ms: (scores[ms].item(), ms)):
            if len(pruned) == config.prune_per_round:
                break
            if kept[module] > MIN_RANKS:
                pruned.append((module, slot))
                kept[module] -= 1
        for module, slot in pruned:
            active[module, slot] = False
        pruned_modules = {module for module, _ in pruned}
        mean_scores = [scores[module][active[module]].mean().item() for module in range(len(layers))]
        # free slots, those pruned in this round last; modules by mean score, those pruned in this round last
        free = [
            sorted(torch.nonzero(~active[m])[:, 0].tolist(), key=lambda s: ((m, s) in pruned, s))
            for m in range(len(layers))
        ]
        candidates = sorted(range(len(layers)), key=lambda m: (m in pruned_modules, -mean_scores[m], m))
        grown = []
        while len(grown) < len(pruned):  # the pruned slots are free: this ends
            for module in candidates:
                if free[module] and len(grown) < len(pruned):
                    grown.append((module, free[module].pop(0)))
        generator = torch.Generator().manual_seed(step)  # the same fresh A on every process, and when resumed
        for module, slot in pruned:
            layers[module].rank_gates[slot] = 0
        for module, slot in grown:
            layers[module].grow(slot, generator)
        for module, slot in pruned + grown:
            _zero_optimizer_state(optimizer, layers[module], slot)
        flat = [module * config.max_rank + slot for module, slot in pruned + grown]
        entry = torch.full((1 + 2 * config.prune_per_round,), -1, dtype=torch.long)
        entry[0] = step
        entry[1 : 1 + len(pruned)] = torch.tensor(flat[: len(pruned)], dtype=torch.long)
        start = 1 + config.prune_per_round
        entry[start : start + len(grown)] = torch.tensor(flat[len(pruned) :], dtype=torch.long)
        self.allocation_log[row] = entry.to(self.allocation_log.device)
        return self.allocation_history()[row]

    def allocation_history(self) -> list[dict]:
        """The rounds done: {"step", "pruned", "grown"} with [module name, slot] pairs (JSON-serialisable)."""
        names, width = list(self.layers), self.method_config.max_rank
        prune = self.method_config.prune_per_round
        history = []
        for entry in self.allocation_log.tolist():
            if entry[0] < 0:
                break
            parts = (entry[1 : 1 + prune], entry[1 + prune :])
            pairs = [[[names[flat // width], flat % width] for flat in part if flat >= 0] for part in parts]
            history.append({"step": entry[0], "pruned": pairs[0], "grown": pairs[1]})
        return history

    # ---- statistics ---------------------------------------------------------------------------------------
    def ranks_per_module(self) -> dict[str, int]:
        """Each adapted module's name -> its active ranks."""
        return {name: layer.active_ranks() for name, layer in self.layers.items()}

    def count_parameters(self) -> dict[str, int]:
        """Every slot's A and B train; a token uses the active ranks' ones."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        active = sum(layer.active_ranks() * (layer.in_features + layer.out_features) for layer in self.layers.values())
        return {"trainable": trainable, "active_per_token": active}

    # ---- saving and loading -------------------------------------------------------------------------------
    def adapter_buffers(self) -> dict[str, Tensor]:
        """The gates of every module (the allocation) and the allocation log."""
        gates = {f"base_model.{name}.rank_gates": layer.rank_gates for name, layer in self.layers.items()}
        return gates | {"allocation_log": self.allocation_log}

    def _remove_adapter(self) -> None:
        for name, layer in self.layers.items():
            replace_module(self.base_model, name, layer.base_layer)
        self.layers.clear()


def held_out_examples(batches: list[dict[str, Tensor]], count: int, start: int) -> list[dict[str, Tensor]]:
    """`count` examples of the batches from the `start`-th on (cycling), tasks alternating (the first example
    of each task, then the second, ...), each as a batch of one row without its padding."""
    rows, seen = [], {}
    for batch in batches:
        for row in range(len(batch["input_ids"])):
            task = int(batch["task_ids"][row]) if "task_ids" in batch else 0
            rows.append(((seen.get(task, 0), task), batch, row))
            seen[task] = seen.get(task, 0) + 1
    rows.sort(key=lambda entry: entry[0])
    examples = []
    for _, batch, row in (rows[(start + i) % len(rows)] for i in range(min(count, len(rows)))):
        real = batch["attention_mask"][row].bool()
        examples.append(
            {
                key: value[row : row + 1, real] if value.dim() == 2 else value[row : row + 1]
                for key, value in batch.items()
            }
        )
    return examples


def _zero_optimizer_state(optimizer: torch.optim.Optimizer | None, layer: AloraLinear, slot: int) -> None:
    """Zero the optimizer's per-element state (Adam's moments) of slot `slot` of the layer's A and B."""
    if optimizer is None:
        return
    for parameter, index in ((layer.lora_A, (slot,)), (layer.lora_B, (slice(None), slot))):
        for value in optimizer.state.get(parameter, {}).values():
            if isinstance(value, Tensor) and value.shape == parameter.shape:
                value[index] = 0
