"""Routers: one file each, registered by name in `ROUTERS`."""

from loramix.routing import prompt, remix, soft, task, topk  # noqa: F401  (registers the built-in routers)
from loramix.routing.base import (
    ROUTERS,
    PromptPooling,
    Router,
    Routing,
    RoutingContext,
    effective_support_size,
    register_router,
)

__all__ = [
    "ROUTERS",
    "PromptPooling",
    "Router",
    "Routing",
    "RoutingContext",
    "effective_support_size",
    "register_router",
]
