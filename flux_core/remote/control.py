"""One job's clock and stop button: the overall deadline, the user's cancel, and sleeps that heed both."""
from __future__ import annotations

import time
from typing import Callable

from .errors import Interrupted, RemoteTimeout

_SLICE_S = 0.05  # how often a wait looks at the cancel button


class Control:
    def __init__(self, deadline_s: float, is_cancelled: Callable[[], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.deadline_s = deadline_s
        self.clock = clock
        self.started = clock()
        self.end = self.started + deadline_s
        self._is_cancelled = is_cancelled or (lambda: False)

    def remaining(self) -> float:
        return max(0.0, self.end - self.clock())

    def elapsed(self) -> float:
        return self.clock() - self.started

    def cancelled(self) -> bool:
        try:
            return bool(self._is_cancelled())
        except Exception:  # a broken callback must not look like a cancel, nor hide the job
            return False

    def check(self) -> None:
        """Raise Interrupted if the user cancelled, RemoteTimeout past the deadline."""
        if self.cancelled():
            raise Interrupted("cancelled by the user")
        if self.clock() >= self.end:
            raise RemoteTimeout(f"no result within the deadline of {self.deadline_s:g} s",
                                hint="try again later, or raise FLUX_JUICED_REMOTE_DEADLINE_S")

    def sleep(self, seconds: float) -> None:
        """Wait, checking the cancel button often; never past the deadline (raises there)."""
        until = min(self.clock() + max(0.0, seconds), self.end)
        while True:
            self.check()
            left = until - self.clock()
            if left <= 0:
                break
            time.sleep(min(_SLICE_S, left))
        self.check()
