"""Environment switches of the speed node (auto | on | off): for tests and for overriding a mode's choice."""
from __future__ import annotations

import logging
import os

LOG = logging.getLogger("flux_juiced.speed")
REQUESTS = ("auto", "on", "off")
_warned: set[tuple[str, str]] = set()


def env_request(variable: str) -> str | None:
    """auto, on or off from the environment variable, or None when unset or unreadable (a bad value is
    warned about once and ignored: the speed mode's own choice applies)."""
    value = os.environ.get(variable, "").strip().lower()
    if not value:
        return None
    if value not in REQUESTS:
        if (variable, value) not in _warned:
            _warned.add((variable, value))
            LOG.warning("%s=%r is not one of %s: the speed mode's own choice applies", variable, value,
                        ", ".join(REQUESTS))
        return None
    return value
