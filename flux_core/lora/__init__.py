"""LoRAs for the engine's FLUX transformer and CLIP-L: read from the common file layouts (files.py) and
applied per call without touching the weights (adapters.py), on dense, fp8 and packed (GGUF/int8/fp8)
models alike.

    from flux_core import lora
    lora.use_loras(models.transformer, [("style.safetensors", 0.8)], clip=models.text_encoders.clip)
    generate(..., loras=[("style.safetensors", 0.8)])    # the same, per call, recorded in the settings
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

from ..lazy import lazy_getattr
from .spec import normalize_loras, parse_lora_spec

# The rest needs torch: imported on first use, so the spec parsing stays importable without it.
_LAZY = {name: "files" for name in ("Lora", "LoraError", "LoraLayer", "read_lora")}
_LAZY.update({name: "adapters" for name in ("applied_loras", "applied_tag", "apply_loras", "remove_loras")})

__all__ = ["normalize_loras", "parse_lora_spec", "use_loras", *_LAZY]

log = logging.getLogger(__name__)

__getattr__ = lazy_getattr(__name__, _LAZY)


def use_loras(model, loras: Sequence[tuple[str | os.PathLike, float]] | None, clip=None) -> list[dict]:
    """Make `loras` ((file, strength) pairs, in order) the LoRAs on the transformer `model` and, given the
    CLIP-L encoder `clip`, on its layers the files train; [] or None removes them. Files are read only when
    the set changes. Warns about tensors a file holds that neither model takes."""
    from .adapters import applied_loras, applied_tag, apply_loras
    from .files import read_lora

    request = tuple((os.path.abspath(os.fspath(p)), float(s), _stamp(p)) for p, s in loras or ())
    if request == applied_tag(model) and (clip is None or request == applied_tag(clip)):
        return applied_loras(model)
    read = []
    for path, strength, _ in request:
        lora = read_lora(path, model, clip=clip)
        if lora.text_encoder_keys:
            log.warning("%s: %d text-encoder tensors left out (the engine applies LoRAs to the transformer and "
                        "CLIP-L)", lora.name, len(lora.text_encoder_keys))
        if lora.unknown_keys:
            log.warning("%s: %d tensors match no layer of this transformer and are left out, e.g. %s",
                        lora.name, len(lora.unknown_keys), ", ".join(lora.unknown_keys[:3]))
        read.append((lora, strength))
    summary = [lora.summary(strength) for lora, strength in read]
    if clip is not None:
        apply_loras(clip, [(lora.clip_layers, strength) for lora, strength in read], tag=request)
    return apply_loras(model, [(lora.layers, strength) for lora, strength in read], tag=request, summary=summary)


def _stamp(path) -> tuple[float, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None  # read_lora reports the missing file
    return stat.st_mtime, stat.st_size
