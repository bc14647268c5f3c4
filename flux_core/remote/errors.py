"""Errors of the remote providers: each names the provider, the task id (when one exists) and what to do.

Messages are built when they are read, so context added later (the task id, known once a submit has
answered) shows, and every message goes through keys.redact: a key echoed by a server never reaches a
log, a history entry or a terminal.
"""
from __future__ import annotations

from ..errors import FluxError
from .keys import redact


class RemoteError(FluxError, RuntimeError):
    """Base of every remote failure."""

    retryable = False  # whether the transport may try the same call again

    def __init__(self, problem: str, *, provider: str | None = None, task_id: str | None = None,
                 hint: str | None = None, status: int | None = None):
        super().__init__(problem)
        self.problem = problem
        self.provider = provider
        self.task_id = task_id
        self.hint = hint
        self.status = status

    def with_context(self, provider: str | None = None, task_id: str | None = None) -> "RemoteError":
        self.provider = self.provider or provider
        self.task_id = self.task_id or task_id
        return self

    def __str__(self) -> str:
        head = f"[{self.provider}] " if self.provider else ""
        task = f" (task {self.task_id})" if self.task_id else ""
        tail = f". What to do: {self.hint}" if self.hint else ""
        return redact(f"{head}{self.problem}{task}{tail}")


class MissingKey(RemoteError):
    """No key in the environment or the keys file."""


class AuthError(RemoteError):
    """401/403: the key was refused."""


class PaymentRequired(RemoteError):
    """402, or a task rejected for balance."""


class InvalidRequest(RemoteError):
    """The provider refused the inputs (400/422), or the pack refused a value it cannot send honestly."""


class RateLimited(RemoteError):
    """429 after every allowed retry, or a Retry-After beyond the deadline."""


class ProviderUnavailable(RemoteError):
    """5xx or connection failures after every allowed retry."""


class SubmitUncertain(RemoteError):
    """The submit may have reached the provider but no answer came: a job may exist and be billed."""


class ModerationError(RemoteError):
    """The provider refused the prompt or the image (never retried, never a black image)."""


class TaskFailed(RemoteError):
    """The provider ran the job and reports a failure."""


class TaskCancelled(RemoteError):
    """The provider cancelled the job (not by us)."""


class ResultExpired(RemoteError):
    """The result link or the task is gone (signed URLs expire, outputs are deleted)."""


class MalformedReply(RemoteError):
    """A reply that is not what the protocol promises: invalid JSON, HTML, missing fields, not an image."""


class DownloadRefused(RemoteError):
    """A result link with a scheme other than http(s), or bigger than the cap."""


class RemoteTimeout(RemoteError):
    """The overall deadline passed."""


class Interrupted(RemoteError):
    """The user cancelled (ComfyUI's interrupt, Ctrl-C); the job was cancelled at the provider if it can be."""
