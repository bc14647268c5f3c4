"""Small random autoencoders in the diffusers layout, and helpers to write them in every other layout."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from flux_core.autoencoder import TINY_AE, AutoEncoderParams


def diffusers_config(p: AutoEncoderParams = TINY_AE) -> dict:
    levels = len(p.ch_mult)
    return dict(
        in_channels=p.in_channels, out_channels=p.out_ch,
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=[p.ch * m for m in p.ch_mult], layers_per_block=p.num_res_blocks,
        latent_channels=p.z_channels, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=p.scale_factor, shift_factor=p.shift_factor,
    )


def random_diffusers_vae(p: AutoEncoderParams = TINY_AE, seed: int = 0):
    """A diffusers AutoencoderKL whose every parameter is random, GroupNorm affines included, so that a
    swapped norm, block or level changes the output."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**diffusers_config(p)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in vae.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if param.ndim > 1:  # conv / linear: fan-in scaling keeps activations of order one
                param.copy_(noise / math.sqrt(param[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.3 * noise)
            else:
                param.copy_(0.3 * noise if "norm" in name else 0.1 * noise)
    return vae


def contiguous(state_dict: dict, dtype: torch.dtype | None = None, prefix: str = "") -> dict:
    """A copy that save_file accepts (no shared or strided storage), optionally cast and prefixed."""
    return {prefix + k: (v.to(dtype) if dtype is not None else v).detach().clone().contiguous()
            for k, v in state_dict.items()}


def write_diffusers_root(vae, root: Path) -> Path:
    """A FLUX-style diffusers pipeline folder: model_index.json, vae/ and a decoy transformer/."""
    root.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "FluxPipeline", "vae": ["diffusers", "AutoencoderKL"],
         "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    (root / "transformer").mkdir(exist_ok=True)
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(4, 4)},
              str(root / "transformer" / "diffusion_pytorch_model.safetensors"))
    return root


def old_attention_names(state_dict: dict) -> dict:
    """The diffusers layout of files saved before 0.14: query/key/value/proj_attn attention names."""
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    out = {}
    for k, v in state_dict.items():
        for old, new in renames.items():
            k = k.replace(old, new)
        out[k] = v
    return out


def linear_attention(state_dict: dict) -> dict:
    """BFL names with the mid attention projections stored as Linear weights [C, C]."""
    return {k: (v.reshape(v.shape[:2]) if ".attn_1." in k and k.endswith("weight") and v.ndim == 4 else v)
            for k, v in state_dict.items()}
