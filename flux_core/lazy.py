"""Package attributes imported on first use: so a package whose light parts must import without torch (the
speed presets, the LoRA spec parsing) can still offer its torch-based parts by name."""
from __future__ import annotations

import importlib


def lazy_getattr(package: str, table: dict[str, str]):
    """A module-level __getattr__ for `package`: `name` in table comes from the submodule table[name]."""
    def __getattr__(name: str):
        if name in table:
            return getattr(importlib.import_module(f".{table[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__
