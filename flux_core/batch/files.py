"""Crash-safe file handling for a batch's output folder: atomic writes, checksums, leftovers of killed
runs, one run per folder at a time, and a Ctrl-C that waits for the file and manifest line in hand."""
from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
from pathlib import Path

PARTIAL_SUFFIX = ".part"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(folder) -> None:
    """Make a rename durable; not every system can open a folder (Windows), where this is a no-op."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path, data: bytes) -> Path:
    """Write data under path so that path is either absent, the old file, or the whole new file.

    A run killed mid-write leaves only a hidden ".<name>.<pid>.part" file, which clean_partials removes.
    An existing file is replaced: in a batch folder it can only be an item whose manifest line was never
    written (the run was cut off between the two), so the item is being made again.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return path


def clean_partials(folder) -> list[Path]:
    """Remove the temp files runs killed mid-write left behind (ours and flux_core.image_files')."""
    removed = []
    for p in Path(folder).glob(f".*{PARTIAL_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


class FolderBusyError(RuntimeError):
    """Another run holds the output folder."""


class FolderLock:
    """An exclusive lock on an output folder, so two runs never write the same manifest at once.

    Held through an open file with flock (released by the OS when the process dies, even on SIGKILL).
    Where flock does not exist the lock is a no-op.
    """

    def __init__(self, folder):
        self.path = Path(folder) / ".lock"
        self.file = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            self.file = None
            raise FolderBusyError(f"another batch is writing to {self.path.parent} (it holds {self.path.name}); "
                               "wait for it to finish or use another --out") from None
        return self

    def __exit__(self, *exc):
        if self.file:
            self.file.close()  # closing releases the flock


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name))


@contextlib.contextmanager
def sigint_deferred():
    """Hold Ctrl-C (and SIGTERM) until the block is done: an image and its manifest line are published
    together. Only the main thread can install signal handlers; elsewhere the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(pending):  # each signal once, in the order it came
            handler = previous[sig]
            if callable(handler):
                handler(sig, None)  # e.g. Python's default SIGINT handler: raises KeyboardInterrupt here
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), sig)
