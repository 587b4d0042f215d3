"""Which layers a method adapts, and swapping them: the helpers every method shares (as peft's tuners_utils)."""

from __future__ import annotations

import re

from torch import nn
from transformers.pytorch_utils import Conv1D

_DECODER_LAYER = re.compile(r"^(.*?\.\d+)\.")


def linear_features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a GPT-2 style Conv1D."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    raise TypeError(f"cannot adapt {type(layer).__name__}: loramix adapts nn.Linear and transformers' Conv1D")


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of the layers loramix can adapt (nn.Linear, Conv1D), the output head excluded."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name for name, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D)) and module is not head
    ]


def find_targets(model: nn.Module, target_modules: list[str] | str, layers: list[int] | None = None) -> list[str]:
    """The names of the layers selected by `target_modules` (suffixes or 'all-linear') inside the numbered
    decoder layers `layers` (None: anywhere)."""
    candidates = linear_layer_names(model)
    if layers is not None:
        candidates = _in_layers(candidates, layers)
    if target_modules == "all-linear":
        return candidates
    selected = [name for name in candidates if any(name == t or name.endswith("." + t) for t in target_modules)]
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in selected)]
    if missing:
        suffixes = sorted({name.rsplit(".", 1)[-1] for name in candidates})
        raise ValueError(
            f"target_modules {missing} match no linear layer of {type(model).__name__}; "
            f"its linear layers end in {suffixes} (for example {candidates[:3]}), or use 'all-linear'"
        )
    return selected


def _in_layers(names: list[str], layers: list[int]) -> list[str]:
    """The names inside a numbered block (`...layers.3.` / `...h.3.`) whose number is in `layers`."""
    numbers = {name: int(match.group(1).rsplit(".", 1)[1]) for name in names if (match := _DECODER_LAYER.match(name))}
    found = sorted(set(numbers.values()))
    missing = sorted(set(layers) - set(found))
    if missing:
        raise ValueError(
            f"layers_to_transform={layers} names layers {missing} that the model does not have; "
            f"its decoder layers are numbered {found[0] if found else '-'} to {found[-1] if found else '-'}"
        )
    return [name for name in names if numbers.get(name) in layers]


def decoder_layer_of(name: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'model.layers.3' (the enclosing numbered block)."""
    match = _DECODER_LAYER.match(name)
    if match is None:
        raise ValueError(
            f"{name!r} lies in no numbered decoder layer (as 'model.layers.3.'), and this adapter (the 'prompt' "
            "router, PEDRO) groups its modules by decoder layer: choose target_modules inside them"
        )
    return match.group(1)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put `module` in the place of `model`'s submodule `name`; returns the module it replaced (to put back)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    replaced = getattr(parent, child)
    setattr(parent, child, module)
    return replaced
