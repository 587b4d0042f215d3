"""loramix: mixture-of-LoRA-experts fine-tuning for Hugging Face causal language models."""

from loramix.compilation import static_decoding
from loramix.compose import compose
from loramix.config import MixLoraConfig
from loramix.layer import MixLoraLinear
from loramix.model import MixLoraModel, load, wrap
from loramix.routing import ROUTERS, Router, Routing, register_router

__version__ = "0.1.0"


__all__ = [
    "ROUTERS",
    "MixLoraConfig",
    "MixLoraLinear",
    "MixLoraModel",
    "Router",
    "Routing",
    "compose",
    "load",
    "register_router",
    "static_decoding",
    "wrap",
]
