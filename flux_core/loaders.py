"""The public loaders: transformer, autoencoder and text encoders from any supported file.

Each part has a plan (the model built on the meta device plus lazy sources for its tensors); a loader
materializes the plan into our module, and read_part gives the same tensors as a reference-named state
dict for hosts that build their own modules (ComfyUI).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from .checkpoints.materialize import LoadPlan
from .checkpoints.reader import open_checkpoint
from .checkpoints.transformer import infer_params, transformer_sources
from .model import Flux

PARTS = ("transformer", "autoencoder", "t5", "clip")


@contextmanager
def transformer_plan(path) -> Iterator[LoadPlan]:
    with open_checkpoint(path, gguf=True) as tf:
        sources = transformer_sources(tf)
        params = infer_params(sources, tf.path)
        with torch.device("meta"):
            model = Flux(params)
        yield LoadPlan(model, sources, tf.path, "FLUX transformer")


def part_plan(path, part: str, dtype: torch.dtype | None = None):
    """The load plan of one part of FLUX.1 in `path` (a context manager)."""
    if part == "transformer":
        return transformer_plan(path)
    if part == "autoencoder":
        from .checkpoints.autoencoder import autoencoder_plan

        return autoencoder_plan(path)
    if part in ("t5", "clip"):
        from .text_encoders.encoders import clip_plan, t5_plan

        return t5_plan(path, dtype) if part == "t5" else clip_plan(path)
    raise ValueError(f"part must be one of {', '.join(PARTS)}; got {part!r}")


def read_part(path, part: str, device="cpu", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """One part's tensors with reference names (transformer, autoencoder) or HF names (t5, clip),
    dequantized and converted to dtype, whatever the file's layout."""
    with part_plan(path, part, dtype) as plan:
        return plan.state_dict(device=device, dtype=dtype)


def load_transformer(path, device="cpu", dtype: torch.dtype = torch.bfloat16, weights: str = "auto") -> Flux:
    """Load a FLUX transformer from a BFL, ComfyUI, all-in-one, diffusers or GGUF file (or sharded folder).

    The configuration (dev/schnell, base/canny-depth/fill, depth, widths) comes from the tensor shapes.
    weights: "auto" keeps GGUF blocks quantized in memory, "dense" expands everything to dtype, "int8" /
    "fp8" also store the dense block weights 8-bit (per-row scales); see flux_core.quant.loading.
    """
    from .quant.loading import choose_storage, materialize_quantized

    with transformer_plan(path) as plan:
        if not choose_storage(plan.module, plan.sources, weights):
            return plan.materialize(device=device, dtype=dtype)
        return materialize_quantized(plan, device=device, dtype=dtype, weights=weights)


def load_autoencoder(path, device="cpu", dtype: torch.dtype = torch.float32):
    """Load the FLUX autoencoder (BFL/LDM or diffusers layout, alone or inside an all-in-one file)."""
    from .checkpoints.autoencoder import load_autoencoder as _load

    return _load(path, device=device, dtype=dtype)


def load_text_encoders(t5_path, clip_path=None, tokenizer_dir=None, device="cpu", dtype: torch.dtype = torch.bfloat16,
                       **kwargs):
    """Load T5-XXL and CLIP-L; the result's encode(list_of_prompts) gives (txt, vec)."""
    from .text_encoders import load_text_encoders as _load

    return _load(t5_path, clip_path, tokenizer_dir=tokenizer_dir, device=device, dtype=dtype, **kwargs)
