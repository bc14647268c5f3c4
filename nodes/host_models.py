"""The engine's loaders feeding the host's own model classes, so the pack's MODEL, CLIP and VAE are the
host's standard types: native samplers, LoRA loaders, block patches and model management all apply.

flux_core reads any supported layout (diffusers, prefixed, all-in-one, fp8, scaled fp8) lean, tensor by
tensor, and hands the host reference-named tensors; the host builds its FLUX modules from them.
"""
from __future__ import annotations

import os
import threading

WEIGHT_DTYPES = ["default", "bf16", "fp16", "fp32", "int8", "fp8"]
# weight_dtype choices that store the block weights 8-bit (per-row scales) and let the host pick the compute
# dtype; GGUF blocks stay packed whatever the choice (quantized_ops.py).
PACKED_STORAGES = ("int8", "fp8")

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


def _host_model_config(state: dict, params):
    """The host's own FLUX model config for these tensors, with the head count, MLP ratio and rotary
    split the engine inferred from the shapes (the host assumes the 12B model's; equal for real files)."""
    import comfy.model_detection

    unet_config = comfy.model_detection.detect_unet_config(state, "")
    if not unet_config or unet_config.get("image_model") != "flux":
        raise RuntimeError("ComfyUI does not recognise these tensors as a FLUX.1 transformer")
    unet_config.update(num_heads=params.num_heads, mlp_ratio=params.mlp_ratio, axes_dim=list(params.axes_dim))
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, state)
    if model_config is None:
        raise RuntimeError(f"ComfyUI has no FLUX model class for {unet_config}")
    return model_config


def load_model(path: str, weight_dtype: str = "default"):
    """A host MODEL (ModelPatcher around the host's own FLUX) with the transformer in `path`."""
    def build():
        import comfy.model_management as mm
        import comfy.model_patcher
        import comfy.utils
        import torch
        from ..flux_core.loaders import part_plan

        from . import packed_lora
        from .quantized_ops import packed_state

        storage = weight_dtype if weight_dtype in PACKED_STORAGES else "auto"
        requested = None if storage != "auto" else _torch_dtype(weight_dtype)
        with part_plan(path, "transformer") as plan:
            params = plan.module.params
            packed = packed_state(plan, storage, requested)  # dense tensors as stored unless a dtype is asked
            state = packed.state if packed else plan.state_dict(dtype=requested or torch.bfloat16)
        shapes = packed.shapes if packed else state  # logical shapes, for detection and the parameter count
        model_config = _host_model_config(shapes, params)
        if packed:
            model_config.custom_operations = packed.operations
        load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
        dtype = requested or mm.unet_dtype(model_params=comfy.utils.calculate_parameters(shapes),
                                           supported_dtypes=list(model_config.supported_inference_dtypes),
                                           weight_dtype=torch.bfloat16)
        model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device,
                                                                    model_config.supported_inference_dtypes))
        model = model_config.get_model(state, "")
        if packed:  # built on meta: the weights must arrive before the model can move
            model.load_model_weights(state, "")
            model = model.to(offload_device)
        else:
            model = model.to(offload_device)
            model.load_model_weights(state, "")
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
        if packed:
            packed_lora.enable(patcher)  # LoRAs and other weight patches on the packed layers
        return patcher

    return _cached("transformer", _file_key(path) + (weight_dtype,), build)


def _read_with_config(path: str, part: str, dtype):
    """A text encoder's tensors plus the config the engine inferred from their shapes."""
    from ..flux_core.loaders import part_plan

    with part_plan(path, part, dtype) as plan:
        return plan.state_dict(dtype=dtype), plan.module.config


def _host_text_encoder_options(t5_cfg, clip_cfg) -> dict:
    """Config overrides for the host's T5-XXL/CLIP-L classes, so non-standard sizes (tiny test models)
    load too; for the real files they repeat the host's own defaults.

    CLIP-L's overrides go under two keys: 0.3.75 rebuilds "clip_l_model_config" from "model_config" when it
    sees a CLIP state dict (its long-CLIP support), later hosts may read the first directly.
    """
    clip_l = {"hidden_size": clip_cfg.hidden_size, "intermediate_size": clip_cfg.intermediate_size,
              "num_attention_heads": clip_cfg.num_heads, "num_hidden_layers": clip_cfg.num_layers,
              "vocab_size": clip_cfg.vocab_size, "max_position_embeddings": clip_cfg.max_positions}
    return {
        "t5xxl_model_config": {"d_model": t5_cfg.d_model, "d_ff": t5_cfg.d_ff, "d_kv": t5_cfg.d_kv,
                               "num_heads": t5_cfg.num_heads, "num_layers": t5_cfg.num_layers,
                               "vocab_size": t5_cfg.vocab_size},
        "clip_l_model_config": clip_l,
        "model_config": dict(clip_l),
    }


def load_clip(t5_path: str, clip_path: str):
    """A host CLIP (FLUX type: CLIP-L + T5-XXL) from any supported layout of each file."""
    def build():
        import comfy.sd
        import folder_paths
        import torch

        clip_state, clip_cfg = _read_with_config(clip_path, "clip", torch.float16)
        t5_state, t5_cfg = _read_with_config(t5_path, "t5", torch.float16)
        clip = comfy.sd.load_text_encoder_state_dicts(
            [clip_state, t5_state], embedding_directory=folder_paths.get_folder_paths("embeddings"),
            clip_type=comfy.sd.CLIPType.FLUX, model_options=_host_text_encoder_options(t5_cfg, clip_cfg))
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
