"""The public loaders: transformer, autoencoder and text encoders from any supported file."""
from __future__ import annotations

import torch

from .checkpoints.materialize import materialize
from .checkpoints.reader import open_checkpoint
from .checkpoints.transformer import infer_params, transformer_sources
from .model import Flux


def load_transformer(path, device="cpu", dtype: torch.dtype = torch.bfloat16) -> Flux:
    """Load a FLUX transformer from a BFL, ComfyUI, all-in-one or diffusers file (or sharded folder).

    The configuration (dev/schnell, base/canny-depth/fill, depth, widths) comes from the tensor shapes.
    """
    with open_checkpoint(path) as tf:
        sources = transformer_sources(tf)
        params = infer_params(sources, tf.path)
        with torch.device("meta"):
            model = Flux(params)
        return materialize(model, sources, path=tf.path, what="FLUX transformer", device=device, dtype=dtype)


def load_autoencoder(path, device="cpu", dtype: torch.dtype = torch.float32):
    """Load the FLUX autoencoder (BFL/LDM or diffusers layout, alone or inside an all-in-one file)."""
    from .checkpoints.autoencoder import load_autoencoder as _load

    return _load(path, device=device, dtype=dtype)


def load_text_encoders(t5_path, clip_path, tokenizer_dir=None, device="cpu", dtype: torch.dtype = torch.bfloat16,
                       **kwargs):
    """Load T5-XXL and CLIP-L; the result's encode(list_of_prompts) gives (txt, vec)."""
    from .text_encoders import load_text_encoders as _load

    return _load(t5_path, clip_path, tokenizer_dir=tokenizer_dir, device=device, dtype=dtype, **kwargs)
