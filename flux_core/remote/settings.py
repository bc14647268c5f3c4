"""Timeouts, retry and polling settings, and provider base addresses; all overridable from the environment.

The defaults suit real providers (a flux-dev job takes seconds to a minute; a 10 minute deadline as
ComfyUI's own API nodes). Tests and self-hosted gateways shorten them through the variables below.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field, fields
from urllib.parse import urlsplit

from .errors import InvalidRequest

ENV_PREFIX = "FLUX_JUICED_REMOTE_"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class RemoteSettings:
    deadline_s: float = 600.0          # the whole job: submit, wait, download
    connect_timeout_s: float = 10.0    # per connection
    read_timeout_s: float = 60.0       # per reply (between bytes)
    poll_interval_s: float = 1.0
    max_attempts: int = 5              # per call, the first included
    backoff_base_s: float = 1.0        # waits: min(cap, base * 2**(n-1)) * uniform(0.5, 1.5), capped again
    backoff_cap_s: float = 30.0
    max_retry_after_s: float = 120.0   # a longer Retry-After is not waited for
    stream_idle_s: float = 30.0        # inference.sh: heartbeats only for this long -> reconcile with a GET
    stream_reconnects: int = 3         # then fall back to polling
    not_found_grace: int = 3           # BFL "Task not found" right after submit: polls before it is final
    max_download_mb: float = 64.0      # result images (a 2 MP png is a few MB)
    strict: bool = False               # refuse instead of clamping what a provider cannot honour
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    @property
    def max_download_bytes(self) -> int:
        return int(self.max_download_mb * 1024 * 1024)

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "RemoteSettings":
        """Defaults, then FLUX_JUICED_REMOTE_<FIELD> (e.g. FLUX_JUICED_REMOTE_DEADLINE_S=120), then overrides."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            if f.name == "rng":
                continue
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            try:
                if f.type in ("bool", bool):
                    values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
                elif f.type in ("int", int):
                    values[f.name] = int(raw)
                else:
                    values[f.name] = float(raw)
            except ValueError:
                raise InvalidRequest(f"{ENV_PREFIX + f.name.upper()}={raw!r} is not a number") from None
        values.update(overrides)
        return cls(**values)


def env_names() -> list[str]:
    return [ENV_PREFIX + f.name.upper() for f in fields(RemoteSettings) if f.name != "rng"]


def base_url(provider: str, env_var: str, default: str) -> str:
    """The provider's base address: env_var if set (tests, gateways), else the public one.

    Plain http is allowed only to this machine: a key must not cross a network unencrypted.
    """
    value = (os.environ.get(env_var) or default).strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"{env_var}={value!r} is not an http(s) address", provider=provider,
                             hint="give a full address such as https://gateway.example/")
    if parts.scheme == "http" and parts.hostname not in LOOPBACK and os.environ.get("FLUX_JUICED_ALLOW_HTTP") != "1":
        raise InvalidRequest(f"{env_var} uses plain http to {parts.hostname}: the key would travel unencrypted",
                             provider=provider, hint="use https, or set FLUX_JUICED_ALLOW_HTTP=1 for a trusted network")
    return value
