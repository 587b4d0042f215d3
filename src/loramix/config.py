"""MixLoraConfig: every setting of a mixture-of-LoRA adapter (the method `mixlora`), validated on creation, and
what its model card says of it."""

from __future__ import annotations

from dataclasses import dataclass, field

from loramix.methods.base import MethodConfig
from loramix.routing import ROUTERS
from loramix.routing.base import POOLINGS

ROUTING_LEVELS = ("token", "sequence")
REMIX_SCALINGS = ("rslora", "lora")
PAPERS = {  # router -> (method, paper), as the model card names them
    "soft": ("soft mixture of LoRA experts (MoLoRA)", "arXiv 2309.05444"),
    "topk": ("learned top-k mixture of LoRA experts (MixLoRA)", "arXiv 2404.15159"),
    "remix": ("ReMix, reinforcement routing of LoRA experts", "arXiv 2603.10160"),
    "task": ("MOELoRA, task-motivated gate", "arXiv 2310.18339"),
    "prompt": ("MiLoRA, prompt-aware routing", "arXiv 2410.18035"),
}
CONTRASTIVE_PAPER = ("SparseDoctor, contrastive expert routing with an expert memory queue", "arXiv 2509.14269")


@dataclass
class MixLoraConfig(MethodConfig):
    """Settings of a mixture-of-LoRA adapter (see the shared METHODS.md for each router)."""

    target_modules: list[str] | str = field(
        metadata={"help": "Suffixes of the linear layers to adapt, or 'all-linear' (every linear but the output head)."}
    )
    layers_to_transform: list[int] | None = field(
        default=None,
        metadata={"help": "Indices of the decoder layers to adapt (as peft's), e.g. the upper half; None: all."},
    )
    num_experts: int = field(default=8, metadata={"help": "LoRA experts per adapted layer (ignored by 'prompt')."})
    expert_rank: int = field(default=4, metadata={"help": "Rank r of each expert."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    router: str = field(default="topk", metadata={"help": "Registered router name: soft, topk, remix, task, prompt."})
    top_k: int = field(default=2, metadata={"help": "Active experts (or modules, for 'prompt') per token."})
    routing_level: str = field(
        default="token",
        metadata={"help": "'token': route every token; 'sequence': route once from the prompt."},
    )
    num_tasks: int | None = field(default=None, metadata={"help": "Number of task ids (required by 'task')."})
    task_embed_dim: int = field(default=64, metadata={"help": "Task embedding size of the MOELoRA gate."})
    shared_task_gate: bool = field(default=True, metadata={"help": "One task gate for all layers (MOELoRA)."})
    balance_loss_weight: float = field(default=0.01, metadata={"help": "Switch load-balance loss weight."})
    z_loss_weight: float = field(default=0.0, metadata={"help": "Router z-loss weight (ST-MoE)."})
    remix_samples: int = field(default=4, metadata={"help": "ReMix: routing samples M per batch (RLOO)."})
    remix_scaling: str = field(default="rslora", metadata={"help": "ReMix weight: alpha/sqrt(k r) or alpha/(k r)."})
    contrastive_loss_weight: float = field(default=0.0, metadata={"help": "SparseDoctor contrastive loss weight."})
    contrastive_temperature: float = field(default=0.07, metadata={"help": "InfoNCE temperature."})
    memory_queue_size: int = field(default=256, metadata={"help": "Per-expert FIFO queue of negatives."})
    prompt_pooling: str = field(default="attention", metadata={"help": "Prompt pooling: attention, mean, last."})
    added_experts: int | list[int] = field(
        default=0,
        metadata={
            "help": "'task': experts per layer added by a continuing run, used by tasks >= added_from_task; a list "
            "(one entry per continuation) when experts were added more than once."
        },
    )
    added_from_task: int | list[int] | None = field(
        default=None,
        metadata={"help": "'task': the first task id that may use the added experts (a list: of each addition)."},
    )
    added_exclusive: bool | list[bool] = field(
        default=False,
        metadata={
            "help": "'task': whether the tasks of an addition route over the experts added for them alone (a list: "
            "of each addition); false: over every expert that existed when they were added."
        },
    )

    def __post_init__(self) -> None:
        self._check_targets()
        if self.router not in ROUTERS:
            self._fail("router", self.router, f"allowed: {sorted(ROUTERS)}")
        self._check_integers(("num_experts", "expert_rank", "top_k", "task_embed_dim", "memory_queue_size"))
        if self.router != "prompt" and self.top_k > self.num_experts:
            self._fail("top_k", self.top_k, f"must be <= num_experts={self.num_experts}")
        if self.router == "remix" and self.top_k == self.num_experts:
            self._fail(
                "top_k",
                self.top_k,
                f"remix samples a strict subset: must be < num_experts={self.num_experts}",
            )
        self._check_choice("routing_level", ROUTING_LEVELS)
        if self.router == "task" and self.routing_level != "token":
            self._fail("routing_level", self.routing_level, "the 'task' router routes by task id: use 'token'")
        if self.router == "task" and (not isinstance(self.num_tasks, int) or self.num_tasks < 1):
            self._fail("num_tasks", self.num_tasks, "the 'task' router needs num_tasks, an integer >= 1")
        if self.num_tasks is not None and (not isinstance(self.num_tasks, int) or self.num_tasks < 1):
            self._fail("num_tasks", self.num_tasks, "expected None or an integer >= 1")
        if not 0.0 <= self.dropout < 1.0:
            self._fail("dropout", self.dropout, "expected 0 <= dropout < 1")
        self._check_numbers(("alpha",), strict=True)
        self._check_numbers(("balance_loss_weight", "z_loss_weight", "contrastive_loss_weight"))
        if not isinstance(self.remix_samples, int) or self.remix_samples < 2:
            self._fail("remix_samples", self.remix_samples, "RLOO needs at least 2 samples")
        self._check_choice("remix_scaling", REMIX_SCALINGS)
        if not self.contrastive_temperature > 0:
            self._fail("contrastive_temperature", self.contrastive_temperature, "expected a number > 0")
        if self.contrastive_loss_weight > 0 and self.router not in ("topk", "remix"):
            self._fail(
                "contrastive_loss_weight",
                self.contrastive_loss_weight,
                "the contrastive loss needs a sparse expert router: topk or remix",
            )
        self._check_choice("prompt_pooling", POOLINGS)
        self._check_added_experts()

    def _check_added_experts(self) -> None:
        chained = isinstance(self.added_experts, list)
        if chained:
            sizes, firsts = self.added_experts, self.added_from_task
            if not sizes or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in sizes):
                self._fail("added_experts", sizes, "expected an integer >= 0 or a non-empty list of integers >= 1")
            if not isinstance(firsts, list) or len(firsts) != len(sizes):
                self._fail("added_from_task", firsts, f"with added_experts={sizes} expected a list of {len(sizes)} ids")
        else:
            self._check_integers(("added_experts",), minimum=0)
            sizes, firsts = [self.added_experts] if self.added_experts else [], [self.added_from_task]
        if sizes and self.router != "task":
            self._fail("added_experts", self.added_experts, "experts are added to 'task'-router runs only: use 0")
        flags = self.added_exclusive
        if not (isinstance(flags, bool) or isinstance(flags, list) and all(isinstance(f, bool) for f in flags)):
            self._fail("added_exclusive", flags, "expected true, false or a list of them (one per addition)")
        if isinstance(flags, list) and len(flags) != len(sizes):
            self._fail("added_exclusive", flags, f"with added_experts={self.added_experts} expected {len(sizes)} flags")
        last = (self.num_tasks or 1) - 1
        for index, first in enumerate(firsts[: len(sizes)]):
            earlier = firsts[index - 1] if index else 0
            if not (isinstance(first, int) and not isinstance(first, bool) and earlier < first <= last):
                self._fail(
                    "added_from_task",
                    self.added_from_task,
                    f"with added_experts > 0 expected a task id from 1 to num_tasks - 1 = {last}"
                    + (", each addition's above the one before" if chained else ""),
                )

    def added_groups(self) -> list[tuple[int, int]]:
        """(first task id, experts per layer) of each time a continuing run added experts, oldest first."""
        if isinstance(self.added_experts, list):
            return list(zip(self.added_from_task, self.added_experts, strict=True))
        return [(self.added_from_task, self.added_experts)] if self.added_experts else []

    def exclusive_additions(self) -> list[bool]:
        """Of each addition in `added_groups`, whether its tasks use only the experts it added."""
        flags = self.added_exclusive
        return list(flags) if isinstance(flags, list) else [flags] * len(self.added_groups())

    def card_details(self) -> tuple[tuple[str, str], dict[str, str]]:
        """(its router's method and paper, or SparseDoctor's when the contrastive loss is on; the settings a
        reader of the card needs to know what was trained)."""
        method = CONTRASTIVE_PAPER if self.contrastive_loss_weight > 0 else PAPERS[self.router]
        layers = self.layers_to_transform
        details = {
            "router": self.router,
            "experts": f"{self.num_experts} of rank {self.expert_rank}",
            "adapted modules": str(self.target_modules),
            "decoder layers": "all" if layers is None else f"{min(layers)}-{max(layers)} ({len(layers)})",
        }
        if self.router in ("topk", "remix", "prompt"):
            details["active experts (top k)"] = str(self.top_k)
        if self.router == "remix":
            details["routing samples (RLOO, M)"] = str(self.remix_samples)
        return method, details
