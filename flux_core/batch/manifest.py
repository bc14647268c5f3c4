"""The batch's records, append-only JSON lines made durable one line at a time:

* manifest.jsonl: one line per finished image (inputs, seed, file, sha256, timings, evaluations, ...),
  written only after the image file is complete under its final name;
* seeds.jsonl: the seed drawn for each job that asked for a random one (-1), written before its first
  image is made, so a resumed run makes the remaining variations from the same seed.

A run killed while appending can leave a torn last line; readers skip it and the next append cuts it off.
A torn line anywhere else means the file was damaged by something else, and is reported.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .files import sha256_file

MANIFEST = "manifest.jsonl"
SEEDS = "seeds.jsonl"
FAILURES = "failures.jsonl"


class ManifestError(ValueError):
    pass


class JsonlLog:
    def __init__(self, path):
        self.path = Path(path)

    def read(self) -> list[dict]:
        """Every complete record; a torn last line (no newline, or not JSON) is ignored."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # tail: after the last newline, empty unless torn
        records = []
        for number, raw in enumerate(complete, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                if number == len(complete) and not tail:
                    continue  # the last line: cut off mid-record (e.g. by a full disk)
                raise ManifestError(f"{self.path} line {number} is not valid JSON: the file is damaged; "
                                    "move the line away (its image will be made again)") from None
            if not isinstance(record, dict):
                raise ManifestError(f"{self.path} line {number}: expected a JSON object")
            records.append(record)
        return records

    def repair(self) -> None:
        """Cut a torn last line off, so the next record starts on a line of its own."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        keep = len(data)
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
        else:
            last = data[:-1].rfind(b"\n") + 1
            try:
                if data[last:].strip():
                    json.loads(data[last:])
            except json.JSONDecodeError:
                keep = last
        if keep != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())

    def append(self, record: dict, durable: bool = True) -> None:
        line = (json.dumps(record, ensure_ascii=False, sort_keys=False) + "\n").encode()
        # One write of the whole line on an O_APPEND descriptor: never interleaved with another line.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
            while written < len(line):  # only on a full disk or a signal; finish the line
                written += os.write(fd, line[written:])
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)


class Manifest(JsonlLog):
    """manifest.jsonl of an output folder; entries by item id, the first one winning."""

    def __init__(self, folder):
        super().__init__(Path(folder) / MANIFEST)
        self.folder = Path(folder)

    def entries(self) -> dict[str, dict]:
        by_id: dict[str, dict] = {}
        for record in self.read():
            by_id.setdefault(record["id"], record)  # a duplicate line never counts twice
        return by_id


def verify(folder) -> list[str]:
    """Problems with a finished batch folder: duplicate ids, missing files, checksum mismatches."""
    manifest = Manifest(folder)
    problems, seen = [], set()
    for record in manifest.read():
        if record["id"] in seen:
            problems.append(f"{record['id']}: listed more than once")
            continue
        seen.add(record["id"])
        path = manifest.folder / record["file"]
        if not path.is_file():
            problems.append(f"{record['id']}: {record['file']} is missing")
        elif sha256_file(path) != record["sha256"]:
            problems.append(f"{record['id']}: {record['file']} does not match its sha256")
    return problems


class SeedBook(JsonlLog):
    """seeds.jsonl: job id -> the seed drawn for it, with the job's fingerprint."""

    def __init__(self, folder):
        super().__init__(Path(folder) / SEEDS)

    def seeds(self) -> dict[str, dict]:
        book: dict[str, dict] = {}
        for record in self.read():
            book.setdefault(record["job"], record)
        return book
