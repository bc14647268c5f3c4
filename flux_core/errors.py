"""Errors the engine raises for bad input, each naming the file, what was found and what was expected."""
from __future__ import annotations

import os


class FluxError(Exception):
    """Base class of every error the engine raises on purpose."""


class CheckpointError(FluxError, ValueError):
    """A model file is missing, unreadable, of the wrong family or of the wrong shape."""

    def __init__(self, path, problem: str, found: str | None = None, expected: str | None = None,
                 hint: str | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.problem = problem
        self.found = found
        self.expected = expected
        self.hint = hint
        parts = [f"{self.path}: {problem}" if self.path else problem]
        if found:
            parts.append(f"found: {found}")
        if expected:
            parts.append(f"expected: {expected}")
        if hint:
            parts.append(hint)
        super().__init__("; ".join(parts))


class TokenizerFilesMissing(FluxError, FileNotFoundError):
    """The tokenizer files for T5 or CLIP are not where they are expected."""
