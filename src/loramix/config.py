"""MixLoraConfig: every setting of a mixture-of-LoRA adapter, validated on creation, saved as JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

ROUTING_LEVELS = ("token", "sequence")
REMIX_SCALINGS = ("rslora", "lora")
PROMPT_POOLINGS = ("attention", "mean", "last")


def _fail(name: str, value: object, allowed: str) -> None:
    raise ValueError(f"MixLoraConfig.{name}={value!r} is invalid: {allowed}")


@dataclass
class MixLoraConfig:
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

    def __post_init__(self) -> None:
        # Imported here: the registry module imports the routers, which import this module.
        from loramix.routing import ROUTERS

        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                self.target_modules = [self.target_modules]
        elif isinstance(self.target_modules, (list, tuple)) and all(isinstance(t, str) for t in self.target_modules):
            self.target_modules = list(self.target_modules)
        else:
            _fail(
                "target_modules",
                self.target_modules,
                "expected a list of module-name suffixes or 'all-linear'",
            )
        if not self.target_modules:
            _fail("target_modules", self.target_modules, "name at least one module suffix, or 'all-linear'")
        layers = self.layers_to_transform
        if layers is not None and not (
            isinstance(layers, (list, tuple))
            and layers
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
        ):
            _fail("layers_to_transform", layers, "expected None or a non-empty list of layer indices >= 0")
        if layers is not None:
            self.layers_to_transform = sorted(set(layers))
        if self.router not in ROUTERS:
            _fail("router", self.router, f"allowed: {sorted(ROUTERS)}")
        for name in ("num_experts", "expert_rank", "top_k", "task_embed_dim", "memory_queue_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, value, "expected an integer >= 1")
        if self.router != "prompt" and self.top_k > self.num_experts:
            _fail("top_k", self.top_k, f"must be <= num_experts={self.num_experts}")
        if self.router == "remix" and self.top_k == self.num_experts:
            _fail(
                "top_k",
                self.top_k,
                f"remix samples a strict subset: must be < num_experts={self.num_experts}",
            )
        if self.routing_level not in ROUTING_LEVELS:
            _fail("routing_level", self.routing_level, f"allowed: {list(ROUTING_LEVELS)}")
        if self.router == "task" and self.routing_level != "token":
            _fail("routing_level", self.routing_level, "the 'task' router routes by task id: use 'token'")
        if self.router == "task" and (not isinstance(self.num_tasks, int) or self.num_tasks < 1):
            _fail("num_tasks", self.num_tasks, "the 'task' router needs num_tasks, an integer >= 1")
        if self.num_tasks is not None and (not isinstance(self.num_tasks, int) or self.num_tasks < 1):
            _fail("num_tasks", self.num_tasks, "expected None or an integer >= 1")
        if not 0.0 <= self.dropout < 1.0:
            _fail("dropout", self.dropout, "expected 0 <= dropout < 1")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            _fail("alpha", self.alpha, "expected a finite number > 0")
        for name in ("balance_loss_weight", "z_loss_weight", "contrastive_loss_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                _fail(name, value, "expected a finite number >= 0")
        if not isinstance(self.remix_samples, int) or self.remix_samples < 2:
            _fail("remix_samples", self.remix_samples, "RLOO needs at least 2 samples")
        if self.remix_scaling not in REMIX_SCALINGS:
            _fail("remix_scaling", self.remix_scaling, f"allowed: {list(REMIX_SCALINGS)}")
        if not self.contrastive_temperature > 0:
            _fail("contrastive_temperature", self.contrastive_temperature, "expected a number > 0")
        if self.contrastive_loss_weight > 0 and self.router not in ("topk", "remix"):
            _fail(
                "contrastive_loss_weight",
                self.contrastive_loss_weight,
                "the contrastive loss needs a sparse expert router: topk or remix",
            )
        if self.prompt_pooling not in PROMPT_POOLINGS:
            _fail("prompt_pooling", self.prompt_pooling, f"allowed: {list(PROMPT_POOLINGS)}")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, values: dict) -> MixLoraConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"MixLoraConfig has no field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> MixLoraConfig:
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no loramix config at {path}") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(values).__name__}")
        return cls.from_dict(values)
