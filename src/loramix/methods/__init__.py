"""loramix's methods: one file per method, each an AdaptedModel subclass registered by name.

The mixture of LoRA experts (`mixlora`, with its routers in loramix.routing) lives in loramix.model; the other
methods are here.
"""

from loramix.methods import (
    adalink,  # noqa: F401  (each import registers its method)
    alora,  # noqa: F401
    iapt,  # noqa: F401
    pedro,  # noqa: F401
)
from loramix.methods.base import (
    METHODS,
    AdaptedModel,
    MethodConfig,
    backbone,
    method_class,
    read_config,
    register_method,
)

__all__ = ["METHODS", "AdaptedModel", "MethodConfig", "backbone", "method_class", "read_config", "register_method"]
