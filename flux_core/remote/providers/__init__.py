"""The providers, by the name the node's choice and `--provider` use."""
from __future__ import annotations

from ..errors import InvalidRequest
from .base import Outcome, Provider, Task
from .bfl import BFL
from .cometapi import CometAPI
from .fal import Fal
from .inference_sh import InferenceSh
from .replicate import Replicate

PROVIDERS: dict[str, type[Provider]] = {cls.name: cls for cls in (InferenceSh, BFL, Fal, Replicate, CometAPI)}
NAMES = list(PROVIDERS)
DEFAULT_PROVIDER = "inference.sh"


def get_provider(name: str) -> type[Provider]:
    try:
        return PROVIDERS[name]
    except KeyError:
        raise InvalidRequest(f"unknown provider {name!r}; choose one of {', '.join(NAMES)}") from None


__all__ = ["PROVIDERS", "NAMES", "DEFAULT_PROVIDER", "get_provider", "Provider", "Task", "Outcome"]
