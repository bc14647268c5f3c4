"""Small helpers for the batch tests: a fake backend for the driver's own checks, and readers for what a
batch folder holds."""
from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from flux_core.batch.driver import ItemResult

IMAGE_SUFFIXES = (".jpg", ".png", ".webp")


class FakeBackend:
    """Makes a 4x4 PNG per item at once. repeat_first hands the first result in twice (as a re-queued item
    finishing on two workers would); fail lists item ids that fail."""

    name = "fake"

    def __init__(self, repeat_first: bool = False, fail=()):
        self.repeat_first, self.fail = repeat_first, set(fail)

    def run(self, items, batch_run):
        for n, item in enumerate(items):
            if item.id in self.fail:
                batch_run.commit(ItemResult(item, error="made to fail"))
                continue
            buffer = io.BytesIO()
            Image.new("RGB", (4, 4), (item.seed % 256, 0, 0)).save(buffer, format="PNG")
            result = ItemResult(item, data=buffer.getvalue(), extension=".png", info={"worker": "fake"})
            batch_run.commit(result)
            if n == 0 and self.repeat_first:
                assert batch_run.commit(result) is False


def write_jobs(path: Path, jobs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


def manifest_lines(folder: Path) -> list[dict]:
    """Every line of the manifest, duplicates included (the tests count them)."""
    path = Path(folder) / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def files_in(folder: Path) -> set[str]:
    """The image files of a batch folder (temp files are hidden and listed by the tests separately)."""
    return {p.name for p in Path(folder).iterdir() if p.suffix in IMAGE_SUFFIXES and not p.name.startswith(".")}


def image_settings(path: Path) -> dict:
    """The settings the engine embeds: PNG text chunks, or the EXIF description (JSON) of jpg/webp."""
    image = Image.open(path)
    if image.format == "PNG":
        return {k: _maybe_json(v) for k, v in image.text.items()}
    return json.loads(image.getexif()[0x010E])


def _maybe_json(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
