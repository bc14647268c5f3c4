"""The engine's loaders feeding the host's own model classes, so the pack's MODEL, CLIP and VAE are the
host's standard types: native samplers, LoRA loaders, block patches and model management all apply.

flux_core reads any supported layout (diffusers, prefixed, all-in-one, fp8, scaled fp8) lean, tensor by
tensor, and hands the host reference-named tensors; the host builds its FLUX modules from them.
"""
from __future__ import annotations

import os
import threading

WEIGHT_DTYPES = ["default", "bf16", "fp16", "fp32"]

_cache_lock = threading.Lock()
_cache: dict[str, tuple[tuple, object]] = {}  # one entry per role: the last model loaded


def _torch_dtype(name: str):
    import torch

    return {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _cached(role: str, key: tuple, build):
    """Keep the last model of each role: re-running a graph reuses it, changing the file replaces it."""
    with _cache_lock:
        hit = _cache.get(role)
        if hit and hit[0] == key:
            return hit[1]
        _cache.pop(role, None)  # drop the old one before building the new one
    value = build()
    with _cache_lock:
        _cache[role] = (key, value)
    return value


def _file_key(*paths) -> tuple:
    return tuple((p, os.path.getmtime(p), os.path.getsize(p)) for p in paths)


def load_model(path: str, weight_dtype: str = "default"):
    """A host MODEL (ModelPatcher around the host's FLUX) with the transformer in `path`."""
    def build():
        import comfy.sd
        import torch
        from ..flux_core.loaders import read_part

        dtype = _torch_dtype(weight_dtype)
        state = read_part(path, "transformer", dtype=dtype or torch.bfloat16)
        model = comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": dtype} if dtype else {})
        if model is None:
            raise RuntimeError(f"ComfyUI did not recognise the FLUX transformer read from {path}")
        return model

    return _cached("transformer", _file_key(path) + (weight_dtype,), build)


def load_clip(t5_path: str, clip_path: str):
    """A host CLIP (FLUX type: CLIP-L + T5-XXL) from any supported layout of each file."""
    def build():
        import comfy.sd
        import folder_paths
        import torch
        from ..flux_core.loaders import read_part

        clip_state = read_part(clip_path, "clip", dtype=torch.float16)
        t5_state = read_part(t5_path, "t5", dtype=torch.float16)
        clip = comfy.sd.load_text_encoder_state_dicts(
            [clip_state, t5_state], embedding_directory=folder_paths.get_folder_paths("embeddings"),
            clip_type=comfy.sd.CLIPType.FLUX)
        if hasattr(clip, "set_tokenizer_option"):  # pad T5 to 512 tokens as the reference does (host: 256)
            clip.set_tokenizer_option("t5xxl_min_length", 512)
        return clip

    return _cached("text_encoders", _file_key(t5_path, clip_path), build)


def load_vae(path: str):
    """A host VAE from the FLUX autoencoder in `path` (BFL or diffusers layout, or inside an all-in-one)."""
    def build():
        import comfy.sd
        from ..flux_core.loaders import read_part

        vae = comfy.sd.VAE(sd=read_part(path, "autoencoder"))
        vae.throw_exception_if_invalid()
        return vae

    return _cached("autoencoder", _file_key(path), build)
