"""Progress of a batch: a bar with images per minute and time left, and the summary printed at the end.

The bar redraws in place on a terminal and prints a line every 10% (and at the end) elsewhere, as
flux_core.progress does for sampling steps.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field


def _duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # NaN: no rate yet
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass
class Summary:
    total: int                 # items in the jobs file
    skipped: int = 0           # already in the manifest when the run started
    done: int = 0              # images made by this run
    failed: int = 0
    requeued: int = 0          # items given to another worker after theirs was lost
    elapsed_s: float = 0.0
    interrupted: bool = False
    failures: list = field(default_factory=list)  # (item id, message)

    @property
    def images_per_minute(self) -> float:
        return 60.0 * self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def remaining(self) -> int:
        return self.total - self.skipped - self.done

    def text(self) -> str:
        state = "interrupted" if self.interrupted else "finished"
        lines = [f"batch {state}: {self.done} images made, {self.skipped} already done, {self.failed} failed, "
                 f"{self.remaining} of {self.total} left; {_duration(self.elapsed_s)} at "
                 f"{self.images_per_minute:.2f} images/min"
                 + (f"; {self.requeued} re-queued after a lost worker" if self.requeued else "")]
        lines += [f"  failed {item}: {message}" for item, message in self.failures[:20]]
        if len(self.failures) > 20:
            lines.append(f"  ... and {len(self.failures) - 20} more (see failures.jsonl)")
        if self.interrupted or self.failed:
            lines.append("rerun the same command to make the missing images; finished ones are kept")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"total": self.total, "skipped": self.skipped, "done": self.done, "failed": self.failed,
                "requeued": self.requeued, "elapsed_s": self.elapsed_s, "interrupted": self.interrupted,
                "images_per_minute": self.images_per_minute}


class BatchProgress:
    """Counts images as they are committed (from any thread) and draws the bar."""

    def __init__(self, summary: Summary, stream=None, quiet: bool = False, width: int = 24):
        self.summary, self.quiet, self.width = summary, quiet, width
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self.lock = threading.Lock()
        self.detail = ""
        self._last_decile = -1

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def image_done(self):
        with self.lock:
            self.summary.done += 1
            self._draw()

    def image_failed(self, item_id: str, message: str):
        with self.lock:
            self.summary.failed += 1
            self.summary.failures.append((item_id, message))
            self._draw(force=True)

    def step(self, text: str):
        """Show what the workers are at (e.g. a sampling step) on a terminal, between images."""
        with self.lock:
            self.detail = text
            if self.tty:
                self._draw()

    def finish(self, interrupted: bool = False) -> Summary:
        with self.lock:
            self.summary.elapsed_s = self.elapsed()
            self.summary.interrupted = interrupted
            if not self.quiet:
                if self.tty:
                    self.stream.write("\n")
                self.stream.write(self.summary.text() + "\n")
                self.stream.flush()
        return self.summary

    def _draw(self, force: bool = False):
        if self.quiet:
            return
        s = self.summary
        todo = max(1, s.total - s.skipped)
        finished = s.done + s.failed
        elapsed = self.elapsed()
        rate = 60.0 * s.done / elapsed if elapsed > 0 else 0.0
        left = (todo - finished) / (rate / 60.0) if rate > 0 else float("nan")
        filled = int(self.width * finished / todo)
        line = (f"batch [{'#' * filled}{'.' * (self.width - filled)}] {finished}/{todo} "
                f"{rate:.2f} img/min, {_duration(left)} left" + (f", {s.failed} failed" if s.failed else ""))
        if self.tty:
            detail = f" | {self.detail}" if self.detail else ""
            self.stream.write("\r\x1b[K" + line + detail)
        else:
            decile = 10 * finished // todo
            if not force and decile == self._last_decile and finished < todo:
                return
            self._last_decile = decile
            self.stream.write(line + "\n")
        self.stream.flush()
