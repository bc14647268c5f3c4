"""Shared fixtures. Keep this small: helpers live in the *_factory.py and comfy_import.py modules."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def comfy():
    """ComfyUI 0.3.75's `comfy` package, imported in-process on the CPU for the module that asks for it.

    Afterwards sys.path and sys.modules are put back, so later tests see an environment without ComfyUI
    (some check that the engine finds ComfyUI without importing it).
    """
    from comfy_import import comfyui_dir, import_comfy

    path_before, modules_before = list(sys.path), set(sys.modules)
    yield import_comfy()
    sys.path[:] = path_before
    host = comfyui_dir().resolve()
    added = []
    for name in set(sys.modules) - modules_before:  # look every module up before removing any
        module = sys.modules.get(name)
        where = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", None) or []), None)
        if where and host in Path(where).resolve().parents:
            added.append(name)
    for name in added:
        sys.modules.pop(name, None)
