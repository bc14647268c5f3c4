"""FLUX.1 [dev] at hosted providers (inference.sh, Black Forest Labs, fal.ai, Replicate, CometAPI), with the
same inputs as the local engine. Standard library HTTP only; keys from the environment or a keys file.

    from flux_core.remote import generate_remote
    result = generate_remote("a juicy orange", provider="bfl", aspect_ratio="16:9", seed=7)
    result.image.save("orange.png"); print(result.seed, result.metadata["task_id"])

See docs/remote.md for the providers, their environment variables and what each one honours.
"""
from __future__ import annotations

from .api import RemoteResult, generate_remote
from .errors import (AuthError, DownloadRefused, InvalidRequest, Interrupted, MalformedReply, MissingKey,
                     ModerationError, PaymentRequired, ProviderUnavailable, RateLimited, RemoteError, RemoteTimeout,
                     ResultExpired, SubmitUncertain, TaskCancelled, TaskFailed)
from .keys import KEY_ENV, redact
from .providers import DEFAULT_PROVIDER, NAMES, PROVIDERS
from .request import SPEED_MODES
from .settings import RemoteSettings

__all__ = ["generate_remote", "RemoteResult", "RemoteSettings", "PROVIDERS", "NAMES", "DEFAULT_PROVIDER", "KEY_ENV",
           "SPEED_MODES", "redact", "RemoteError", "AuthError", "DownloadRefused", "InvalidRequest", "Interrupted",
           "MalformedReply", "MissingKey", "ModerationError", "PaymentRequired", "ProviderUnavailable", "RateLimited",
           "RemoteTimeout", "ResultExpired", "SubmitUncertain", "TaskCancelled", "TaskFailed"]
