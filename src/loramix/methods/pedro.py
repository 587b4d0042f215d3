"""`pedro`: prompt-dependent representation modification (PEDRO, arXiv 2409.17834).

In every adapted decoder layer a light vector generator reads the prompt's hidden states entering the layer
(pooled), and produces one vector per rescaled module, l = 1 + W_up g(W_down rms(pool(H))) with g a learnable
rational activation and rms() a parameter-free RMS normalisation. The outputs of the query and value
projections and of the MLP up-projection (by default) are rescaled element-wise by their vectors, as IA3
rescales them with fixed ones. The vectors are computed once per prompt and reused for every generated token;
each row of a batch gets its own. W_up starts at zero: a freshly wrapped model computes what the base model
computes. The normalisation is not in the paper: without it the pooled hidden states of SmolLM2's upper layers
drove the vectors to divergence (a NaN loss at step 26) at the recipes' learning rate, 1e-3, where LoRA trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor, nn

from loramix.call import CallState
from loramix.methods.base import AdaptedModel, MethodConfig, register_method
from loramix.routing.base import POOLINGS, PromptPooling
from loramix.routing.prompt import RationalActivation
from loramix.targets import decoder_layer_of, find_targets, linear_features

RMS_EPS = 1e-6  # of the normalisation of the pooled hidden states


@dataclass
class PedroConfig(MethodConfig):
    """Settings of a PEDRO adapter."""

    target_modules: list[str] | str = field(
        default_factory=lambda: ["q_proj", "v_proj", "up_proj"],
        metadata={"help": "Suffixes of the modules whose outputs are rescaled (each by a vector of its size)."},
    )
    layers_to_transform: list[int] | None = field(
        default=None, metadata={"help": "Indices of the decoder layers to adapt, e.g. the upper half; None: all."}
    )
    bottleneck: int = field(default=16, metadata={"help": "Bottleneck r of each layer's vector generator."})
    pooling: str = field(default="attention", metadata={"help": "Prompt pooling: attention, mean, last."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the pooled prompt state."})

    def __post_init__(self) -> None:
        self._check_targets()
        self._check_integers(("bottleneck",))
        self._check_choice("pooling", POOLINGS)
        if isinstance(self.dropout, bool) or not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            self._fail("dropout", self.dropout, "expected 0 <= dropout < 1")

    def card_details(self) -> tuple[tuple[str, str], dict[str, str]]:
        method = ("PEDRO, prompt-dependent representation modification", "arXiv 2409.17834")
        targets = self.target_modules if isinstance(self.target_modules, str) else ", ".join(self.target_modules)
        layers = "all" if self.layers_to_transform is None else ", ".join(map(str, self.layers_to_transform))
        return method, {
            "rescaled modules": targets,
            "layers": layers,
            "bottleneck": str(self.bottleneck),
            "pooling": self.pooling,
        }


class VectorGenerator(nn.Module):
    """One decoder layer's vectors, 1 + W_up g(W_down rms(pool(H))): (B, 1, total size) from its (B, T, d)
    input H."""

    def __init__(self, config: PedroConfig, dim: int, total: int) -> None:
        super().__init__()
        self.pool = PromptPooling(dim, config.pooling)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.down = nn.Linear(dim, config.bottleneck, bias=False)
        self.activation = RationalActivation()
        self.up = nn.Linear(config.bottleneck, total)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        pooled = self.pool(hidden, mask).to(self.down.weight.dtype)
        pooled = self.dropout(F.rms_norm(pooled, pooled.shape[-1:], eps=RMS_EPS))
        return 1 + self.up(self.activation(self.down(pooled)))


@dataclass
class BlockVectors:
    """The vectors of one decoder block in the current forward, left by its pre-hook for its modules' hooks."""

    vectors: Tensor | None = None


@register_method("pedro", PedroConfig)
class PedroModel(AdaptedModel):
    """A frozen causal LM whose target modules' outputs are rescaled by vectors generated from the prompt."""

    def __init__(self, model: nn.Module, config: PedroConfig) -> None:
        super().__init__(model, config)
        self.generators = nn.ModuleDict()
        by_block: dict[str, list[str]] = {}
        for name in find_targets(model, config.target_modules, config.layers_to_transform):
            try:
                block_name = decoder_layer_of(name)
            except ValueError:
                config._fail("target_modules", config.target_modules, f"{name!r} is in no numbered decoder layer")
            by_block.setdefault(block_name, []).append(name)
        for block_name, names in by_block.items():
            sizes = [linear_features(model.get_submodule(name))[1] for name in names]
            block = model.get_submodule(block_name)
            dim = model.config.hidden_size
            device = next(block.parameters()).device
            generator = VectorGenerator(config, dim, sum(sizes)).to(device)
            self.generators[block_name.rsplit(".", 1)[1]] = generator
            slot = BlockVectors()
            hook = block.register_forward_pre_hook(_generate(generator, slot, self.context), with_kwargs=True)
            self._add_hook(block_name, hook)
            start = 0
            for name, size in zip(names, sizes, strict=True):
                module = model.get_submodule(name)
                self._add_hook(name, module.register_forward_hook(_rescale(slot, start, start + size)))
                start += size


def _generate(generator: VectorGenerator, slot: BlockVectors, context: CallState):
    """A decoder block's forward pre-hook: its vectors for this forward, from the prompt of its input."""

    def compute(block: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        slot.vectors = context.once_per_prompt(generator, lambda: generator(hidden, context.pooling_mask(hidden)))

    return compute


def _rescale(slot: BlockVectors, start: int, end: int):
    """A target module's forward hook: its output times its slice of the block's vectors."""

    def rescale(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return output * slot.vectors[..., start:end].to(output.dtype)

    return rescale
