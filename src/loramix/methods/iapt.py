"""`iapt`: instruction-aware prompt tuning (IAPT, arXiv 2405.18203).

Every adapted decoder layer has a soft-prompt generator: attention pooling over the instruction's (the
prompt's) hidden states entering the layer, a down-projection d -> r, a rational activation learned per layer
and an up-projection r -> m d give m soft tokens for that layer. They are the layer's prompt: passed through the
layer's own input norm and key/value projections they become m prefix keys and values, without position (as
P-tuning v2's prefixes), that every position of the sequence attends to. The soft tokens are computed once per
prompt and reused by every decoding step; the prefix is rebuilt from them at each forward and never written to
the key-value cache, so generating with and without the cache agrees.

The prefix enters through the attention interface of transformers: each adapted attention module dispatches to
`prefix_attention`, which puts the prefix before the sequence's keys and values and calls the implementation
the module used before (sdpa or eager). The prefix takes attention mass, so a fresh adapter does not compute
what the base model computes.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from loramix.call import CallState
from loramix.methods.base import AdaptedModel, MethodConfig, register_method
from loramix.models import decoder_blocks
from loramix.routing.base import POOLINGS, PromptPooling
from loramix.routing.prompt import RationalActivation

ATTENTION_NAME = "loramix_iapt"  # the attention implementation of the adapted attention modules
PREFIX = "loramix_iapt_prefix"  # the attribute of an adapted attention module holding its LayerPrefix
WRAPPED_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass
class IaptConfig(MethodConfig):
    """Settings of IAPT soft-prompt generators."""

    num_soft_tokens: int = field(default=4, metadata={"help": "Soft tokens m generated for each adapted layer."})
    bottleneck: int = field(default=16, metadata={"help": "Size r of each generator's bottleneck (d -> r -> m d)."})
    pooling: str = field(
        default="attention", metadata={"help": "How the prompt's hidden states are pooled: attention, mean or last."}
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout in each generator's bottleneck."})
    layers_to_transform: list[int] | None = field(
        default=None, metadata={"help": "Decoder layers that get soft tokens (None: all)."}
    )

    def __post_init__(self) -> None:
        self._check_integers(("num_soft_tokens", "bottleneck"))
        self._check_choice("pooling", POOLINGS)
        if not (
            isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool) and 0 <= self.dropout < 1
        ):
            self._fail("dropout", self.dropout, "expected 0 <= dropout < 1")
        self._check_layers()

    def card_details(self) -> tuple[tuple[str, str], dict[str, str]]:
        layers = self.layers_to_transform
        return ("IAPT, instruction-aware prompt tuning", "arXiv 2405.18203"), {
            "soft tokens per layer": str(self.num_soft_tokens),
            "generator bottleneck": str(self.bottleneck),
            "prompt pooling": self.pooling,
            "decoder layers": "all" if layers is None else f"{min(layers)}-{max(layers)} ({len(layers)})",
        }


class SoftPromptGenerator(nn.Module):
    """(B, m, d) soft tokens of one decoder layer from the prompt's (B, T, d) hidden states entering it."""

    def __init__(self, config: IaptConfig, dim: int) -> None:
        super().__init__()
        self.num_tokens = config.num_soft_tokens
        self.pool = PromptPooling(dim, config.pooling)
        self.down = nn.Linear(dim, config.bottleneck)
        self.activation = RationalActivation()
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.up = nn.Linear(config.bottleneck, config.num_soft_tokens * dim)

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        pooled = self.pool(hidden, mask).to(self.down.weight.dtype)  # (B, 1, d)
        tokens = self.up(self.dropout(self.activation(self.down(pooled))))
        return tokens.view(hidden.shape[0], self.num_tokens, hidden.shape[-1]).to(hidden.dtype)


@dataclass
class LayerPrefix:
    """One adapted attention module's prefix for the current forward, and the attention it wraps."""

    attention: Callable  # the implementation the module used before (sdpa, or its model's eager)
    causal_without_mask: bool  # whether that implementation reads a missing mask as causal (sdpa does)
    keys: Tensor | None = None  # (B, kv heads, m, head dim)
    values: Tensor | None = None


def prefix_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs
):
    """The attention of `module` over [its prefix; the sequence]: every query also sees the prefix."""
    prefix: LayerPrefix = getattr(module, PREFIX)
    if prefix.keys is None:  # called outside its decoder block
        return prefix.attention(module, query, key, value, attention_mask, **kwargs)
    count = prefix.keys.shape[2]
    keys = torch.cat([prefix.keys.to(key.dtype), key], dim=2)
    values = torch.cat([prefix.values.to(value.dtype), value], dim=2)
    is_causal = kwargs.get("is_causal")
    causal = (
        prefix.causal_without_mask
        and query.shape[2] > 1
        and (getattr(module, "is_causal", True) if is_causal is None else is_causal)
    )
    if attention_mask is None and causal:  # sdpa's is_causal: query i sees keys 0..i
        length = key.shape[2]
        attention_mask = torch.ones(query.shape[2], length, dtype=torch.bool, device=query.device).tril()[None, None]
    if attention_mask is not None:
        shape = (*attention_mask.shape[:-1], count)
        visible = (
            attention_mask.new_ones(shape) if attention_mask.dtype == torch.bool else attention_mask.new_zeros(shape)
        )
        attention_mask = torch.cat([visible, attention_mask], dim=-1)
    return prefix.attention(module, query, keys, values, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION_NAME, prefix_attention)


# ---- the prefix keys and values of a decoder block's soft tokens, per model family ------------------------------
def _llama_prefix(block: nn.Module, soft: Tensor) -> tuple[Tensor, Tensor]:
    """Through `input_layernorm` and `self_attn.k_proj` / `v_proj` (Llama, Mistral, Qwen2, SmolLM2, ...)."""
    attention, normed = block.self_attn, block.input_layernorm(soft)
    shape = (*soft.shape[:2], -1, attention.head_dim)
    return (
        attention.k_proj(normed).view(shape).transpose(1, 2),
        attention.v_proj(normed).view(shape).transpose(1, 2),
    )


def _gpt2_prefix(block: nn.Module, soft: Tensor) -> tuple[Tensor, Tensor]:
    """Through `ln_1` and the key and value thirds of `attn.c_attn` (GPT-2)."""
    attention = block.attn
    _, keys, values = attention.c_attn(block.ln_1(soft)).split(attention.split_size, dim=2)
    shape = (*soft.shape[:2], -1, attention.head_dim)
    return keys.view(shape).transpose(1, 2), values.view(shape).transpose(1, 2)


def _block_family(model: nn.Module, block: nn.Module) -> tuple[nn.Module, Callable]:
    """(the block's self-attention, the function giving its prefix keys and values), or a ValueError."""
    attention = getattr(block, "self_attn", None)
    if (
        hasattr(block, "input_layernorm")
        and all(hasattr(attention, name) for name in ("k_proj", "v_proj", "head_dim"))
        and getattr(attention, "k_norm", None) is None
    ):
        return attention, _llama_prefix
    attention = getattr(block, "attn", None)
    if hasattr(block, "ln_1") and all(hasattr(attention, name) for name in ("c_attn", "split_size", "head_dim")):
        return attention, _gpt2_prefix
    raise ValueError(
        f"IAPT does not support {type(model).__name__}: its {type(block).__name__} has neither input_layernorm with "
        "self_attn.k_proj / v_proj and no k_norm (Llama, Mistral, Qwen2, SmolLM2) nor GPT-2's ln_1 and attn.c_attn"
    )


def _wrapped_attention(model: nn.Module, attention: nn.Module) -> LayerPrefix:
    """A LayerPrefix around the attention implementation `attention` uses now."""
    implementation = attention.config._attn_implementation
    if implementation not in WRAPPED_IMPLEMENTATIONS:
        raise ValueError(
            f"IAPT extends the sdpa or eager attention with its prefix; {type(model).__name__} uses "
            f"{implementation!r}: load it with attn_implementation='sdpa'"
        )
    if implementation == "sdpa":
        return LayerPrefix(ALL_ATTENTION_FUNCTIONS["sdpa"], causal_without_mask=True)
    eager = getattr(sys.modules[type(attention).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"IAPT found no eager_attention_forward for {type(attention).__name__}: use sdpa attention")
    return LayerPrefix(eager, causal_without_mask=False)


def _make_prefix(generator: SoftPromptGenerator, prefix: LayerPrefix, project: Callable, context: CallState):
    """A decoder block's forward pre-hook: its prefix for this forward, from the soft tokens of the prompt."""

    def make(block: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        soft = context.once_per_prompt(generator, lambda: generator(hidden, context.pooling_mask(hidden)))
        if soft.shape[0] != hidden.shape[0]:
            raise ValueError(
                f"IAPT soft tokens were made for {soft.shape[0]} rows but this forward has {hidden.shape[0]}: "
                "after selecting rows of the key-value cache, call select_rows with them"
            )
        prefix.keys, prefix.values = project(block, soft)

    return make


def _drop_prefix(prefix: LayerPrefix):
    """A decoder block's forward hook: forget the prefix (and its graph) once the block has run."""

    def drop(block: nn.Module, args: tuple, output) -> None:
        prefix.keys = prefix.values = None

    return drop


@register_method("iapt", IaptConfig)
class IaptModel(AdaptedModel):
    """A frozen causal LM whose adapted decoder layers attend to soft tokens generated from the prompt."""

    starts_as_base = False  # the prefix takes attention mass from the sequence's tokens

    def __init__(self, model: nn.Module, config: IaptConfig) -> None:
        super().__init__(model, config)
        self._attention_configs: list[tuple[nn.Module, object]] = []
        try:
            blocks = decoder_blocks(model, "IAPT")
            layers = config.layers_to_transform if config.layers_to_transform is not None else range(len(blocks))
            if any(index >= len(blocks) for index in layers):
                allowed = f"{type(model).__name__} has decoder layers 0-{len(blocks) - 1}"
                config._fail("layers_to_transform", config.layers_to_transform, allowed)
            families = {index: _block_family(model, blocks[index]) for index in layers}
            prefixes = {index: _wrapped_attention(model, attention) for index, (attention, _) in families.items()}
        except ValueError:
            self.unload()
            raise
        dim = model.get_input_embeddings().embedding_dim
        self.generators = nn.ModuleDict()
        for index, (attention, project) in families.items():
            block, prefix = blocks[index], prefixes[index]
            generator = SoftPromptGenerator(config, dim).to(next(block.parameters()).device)
            self.generators[str(index)] = generator
            setattr(attention, PREFIX, prefix)
            self._attention_configs.append((attention, attention.config))
            attention.config = copy.copy(attention.config)  # only this module dispatches to prefix_attention
            attention.config._attn_implementation = ATTENTION_NAME
            name = next(name for name, module in model.named_modules() if module is block)
            pre_hook = block.register_forward_pre_hook(
                _make_prefix(generator, prefix, project, self.context), with_kwargs=True
            )
            self._add_hook(name, pre_hook)
            self._add_hook(name, block.register_forward_hook(_drop_prefix(prefix)))

    def _remove_adapter(self) -> None:
        """Give the adapted attention modules back their config (and attention implementation)."""
        for attention, config in self._attention_configs:
            attention.config = config
            delattr(attention, PREFIX)
        self._attention_configs.clear()
