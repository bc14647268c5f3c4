"""flux_core: the FLUX.1 [dev] engine, pure PyTorch, importable without ComfyUI.

Public entry points mirror the Black Forest Labs reference: load_transformer, load_autoencoder,
load_text_encoders, sampling.get_schedule / get_noise / denoise, and generate. Names resolve lazily so
`import flux_core` stays cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Relative module names: the engine is also imported as a sub-package of the ComfyUI pack.
_EXPORTS = {
    "load_transformer": ".loaders",
    "load_autoencoder": ".loaders",
    "load_text_encoders": ".loaders",
    "generate": ".pipeline",
    "FluxParams": ".model",
    "Flux": ".model",
    "CheckpointError": ".errors",
    "FluxError": ".errors",
    "use_loras": ".lora",
}
__all__ = sorted(_EXPORTS) + ["sampling"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    if name in ("sampling", "presets", "model", "autoencoder", "text_encoders", "checkpoints", "pipeline", "lora"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'flux_core' has no attribute {name!r}")
