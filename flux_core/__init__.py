"""flux_core: the FLUX.1 [dev] engine, pure PyTorch, importable without ComfyUI.

Public entry points mirror the Black Forest Labs reference: load_transformer, load_autoencoder,
load_text_encoders, sampling.get_schedule / get_noise / denoise, and generate. Names resolve lazily so
`import flux_core` stays cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_transformer": "flux_core.loaders",
    "load_autoencoder": "flux_core.loaders",
    "load_text_encoders": "flux_core.loaders",
    "generate": "flux_core.pipeline",
    "FluxParams": "flux_core.model",
    "Flux": "flux_core.model",
    "CheckpointError": "flux_core.errors",
    "FluxError": "flux_core.errors",
}
__all__ = sorted(_EXPORTS) + ["sampling"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in ("sampling", "presets", "model", "autoencoder", "text_encoders", "checkpoints", "pipeline"):
        return importlib.import_module(f"flux_core.{name}")
    raise AttributeError(f"module 'flux_core' has no attribute {name!r}")
