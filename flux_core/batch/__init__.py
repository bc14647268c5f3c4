"""Batch generation: a jobs file (JSON lines) in, images and a manifest out, resumable after a crash.

    python -m flux_core batch jobs.jsonl --out DIR [--demo] [--comfyui URL ...] [--ray] [--workers N]

jobs.py reads and expands the jobs file; driver.py owns the output folder, with manifest.py (the
append-only records) and files.py (atomic writes, the folder lock, signals); progress.py draws the bar
and the summary. The backends make the images: runner.py (this process's engine), comfy_client.py
(ComfyUI servers over HTTP and websocket.py) and ray_runner.py (engine actors on Ray). command.py is the
CLI subcommand. See docs/batch.md. Nothing heavy is imported here.
"""
from __future__ import annotations

from .driver import BatchError, BatchRun, ItemResult, run_batch
from .jobs import Job, JobError, WorkItem, expand, load_jobs, parse_jobs
from .manifest import Manifest, verify

__all__ = ["BatchError", "BatchRun", "ItemResult", "Job", "JobError", "Manifest", "WorkItem", "expand",
           "load_jobs", "parse_jobs", "run_batch", "verify"]
