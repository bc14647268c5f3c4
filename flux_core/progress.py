"""A dependency-free terminal progress bar with rate and time left."""
from __future__ import annotations

import sys
import time


class ProgressBar:
    def __init__(self, total: int, label: str = "", stream=None, width: int = 30):
        self.total, self.label, self.width = total, label, width
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.done = 0
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_percent = -1

    def update(self, done: int | None = None):
        self.done = self.done + 1 if done is None else done
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        filled = int(self.width * self.done / max(1, self.total))
        line = (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{rate:.2f} it/s, {left:.1f}s left")
        percent = 100 * self.done // max(1, self.total)
        if self.tty:
            self.stream.write("\r" + line + ("\n" if self.done >= self.total else ""))
        elif percent // 10 != self._last_percent // 10 or self.done >= self.total:
            self.stream.write(line + "\n")
        self._last_percent = percent
        self.stream.flush()
