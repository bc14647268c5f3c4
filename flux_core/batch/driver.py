"""One batch run over an output folder: what is left to make, and publishing each finished image.

Every backend (local engine, ComfyUI servers, Ray) hands finished images to BatchRun.commit in the
process that owns the folder; only that process writes files and manifest lines, so a lost worker's
images can be made again elsewhere without ever reaching the manifest twice.
"""
from __future__ import annotations

import datetime
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from .files import FolderLock, clean_partials, sha256_bytes, sigint_deferred, write_atomic
from .jobs import Job, WorkItem, expand
from .manifest import FAILURES, JsonlLog, Manifest, SeedBook
from .progress import BatchProgress, Summary


class BatchError(RuntimeError):
    """The output folder does not fit the jobs file (a job changed under the same id)."""


@dataclass
class ItemResult:
    """What a worker hands back for one item: the encoded image, or the error that stopped it."""

    item: WorkItem
    data: bytes = b""
    extension: str = ""      # ".jpg", ".png", ".webp"
    info: dict = field(default_factory=dict)  # seed, width, height, evaluations, timings, worker, ...
    error: str | None = None


class BatchRun:
    def __init__(self, jobs: list[Job], out_dir, backend: str, quiet: bool = False, stream=None):
        self.jobs, self.backend = jobs, backend
        self.folder = Path(out_dir)
        self.quiet, self.stream = quiet, stream
        self.lock = FolderLock(self.folder)
        self.manifest = Manifest(self.folder)
        self.failures = JsonlLog(self.folder / FAILURES)
        self.items: list[WorkItem] = []
        self.pending: list[WorkItem] = []
        self.done_ids: set[str] = set()
        self.progress: BatchProgress | None = None

    # --- opening the folder ---------------------------------------------------------------------------
    def __enter__(self) -> "BatchRun":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock.__enter__()
        try:
            clean_partials(self.folder)
            self.manifest.repair()
            self.items = expand(self.jobs, self._base_seeds())
            done = self.manifest.entries()
            self._check_unchanged(done)
            self.done_ids = {item.id for item in self.items if item.id in done}
            self.pending = [item for item in self.items if item.id not in self.done_ids]
            summary = Summary(total=len(self.items), skipped=len(self.done_ids))
            self.progress = BatchProgress(summary, stream=self.stream, quiet=self.quiet)
        except BaseException:
            self.lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        self.lock.__exit__(*exc)

    def _base_seeds(self) -> dict[str, int]:
        """The seed of every job that asked for a random one: read back, or drawn now and recorded
        before any of its images is made."""
        book = SeedBook(self.folder)
        book.repair()
        known = book.seeds()
        seeds = {}
        for job in self.jobs:
            if job.inputs["seed"] != -1:
                continue
            record = known.get(job.id)
            if record is not None:
                if record.get("fingerprint") != job.fingerprint:
                    raise self._changed(job, "its random seed was drawn")
                seeds[job.id] = record["seed"]
                continue
            seed = secrets.randbits(32)  # as generate() draws; seed + variations stays far below SEED_MAX
            book.append({"job": job.id, "line": job.line, "seed": seed, "fingerprint": job.fingerprint})
            seeds[job.id] = seed
        return seeds

    def _check_unchanged(self, done: dict[str, dict]):
        for item in self.items:
            entry = done.get(item.id)
            if entry is not None and entry.get("fingerprint") != item.fingerprint:
                job = next(j for j in self.jobs if j.id == item.job)
                raise self._changed(job, f"{entry['file']} was made")

    def _changed(self, job: Job, what: str) -> BatchError:
        return BatchError(f"job {job.id!r} (line {job.line}) is not the job it was when {what} in "
                          f"{self.folder}: give the changed job a new id, or use another --out")

    # --- publishing results -----------------------------------------------------------------------------
    def commit(self, result: ItemResult) -> bool:
        """Publish one finished image and its manifest line; False when the item was already published
        (a re-queued item finished twice) or failed."""
        item = result.item
        if result.error is not None:
            self.fail(item, result.error)
            return False
        if item.id in self.done_ids:
            return False
        path = self.folder / f"{item.id}{result.extension}"
        info = dict(result.info)
        entry = {
            "id": item.id, "job": item.job, "line": item.line, "variation": item.variation,
            "file": path.name, "sha256": sha256_bytes(result.data), "bytes": len(result.data),
            "seed": info.pop("seed", item.seed), "prompt": item.inputs["prompt"],
            "width": info.pop("width", item.width), "height": info.pop("height", item.height),
            "inputs": item.inputs, "evaluations": info.pop("evaluations", None),
            "timings": info.pop("timings", {}), "backend": self.backend, **info,
            "fingerprint": item.fingerprint,
            "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        with sigint_deferred():  # the file and its line go out together, or the item is redone
            write_atomic(path, result.data)
            self.manifest.append(entry)
            self.done_ids.add(item.id)
        self.progress.image_done()
        return True

    def fail(self, item: WorkItem, message: str):
        self.failures.append({"id": item.id, "job": item.job, "line": item.line, "error": message,
                              "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
                             durable=False)
        self.progress.image_failed(item.id, message)

    def requeued(self, count: int = 1):
        self.progress.summary.requeued += count

    def finish(self, interrupted: bool = False) -> Summary:
        return self.progress.finish(interrupted)


def run_batch(jobs: list[Job], out_dir, backend, quiet: bool = False, stream=None) -> Summary:
    """Run every item of jobs not yet in out_dir's manifest on backend (an object with .name and
    .run(items, batch_run)). Ctrl-C stops it cleanly: the summary says interrupted=True."""
    with BatchRun(jobs, out_dir, backend.name, quiet=quiet, stream=stream) as run:
        interrupted = False
        try:
            if run.pending:
                backend.run(run.pending, run)
        except KeyboardInterrupt:
            interrupted = True
        return run.finish(interrupted)
