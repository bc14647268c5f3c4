"""Recognising what a checkpoint holds, to pick the right part and to explain a wrong file."""
from __future__ import annotations

from typing import Iterable

# Anchor keys of each part, as suffixes; the text before the suffix is the part's prefix in the file.
TRANSFORMER_BFL = "double_blocks.0.img_attn.qkv.weight"
TRANSFORMER_DIFFUSERS = "transformer_blocks.0.attn.to_q.weight"
VAE_BFL = "decoder.conv_in.weight"
VAE_DIFFUSERS = "decoder.up_blocks.0.resnets.0.norm1.weight"
T5_ANCHOR = "encoder.block.0.layer.0.SelfAttention.q.weight"
CLIP_ANCHOR = "encoder.layers.0.self_attn.q_proj.weight"

# Other model families people put into the wrong folder, recognised by a tell-tale key fragment.
_OTHER_FAMILIES = [
    ("conditioner.embedders", "an SDXL checkpoint"),
    ("input_blocks.0.0.weight", "a Stable Diffusion 1.x/2.x/XL UNet"),
    ("down_blocks.0.resnets.0.conv1.weight", "a diffusers UNet or VAE"),
    ("joint_blocks.0.", "a Stable Diffusion 3 MMDiT"),
    ("lora_", "a LoRA"),
    ("blocks.0.self_attn", "a video/other transformer (not FLUX)"),
    ("model.layers.0.self_attn", "a language model"),
]


def find_prefixes(keys: Iterable[str], anchor: str) -> list[str]:
    """Every prefix under which `anchor` occurs (a file may hold one part, or several in an all-in-one).

    A prefix is empty or ends with a dot, so 'single_transformer_blocks.0...' is no 'transformer_blocks.0...'.
    """
    found = (k[: -len(anchor)] for k in keys if k.endswith(anchor))
    return sorted(p for p in found if p == "" or p.endswith("."))


def describe(keys: Iterable[str]) -> str:
    """A short human description of what a file seems to hold, for error messages."""
    keys = list(keys)
    parts = []
    if find_prefixes(keys, TRANSFORMER_BFL) or find_prefixes(keys, TRANSFORMER_DIFFUSERS):
        parts.append("a FLUX transformer")
    if find_prefixes(keys, VAE_BFL) or find_prefixes(keys, VAE_DIFFUSERS):
        parts.append("an autoencoder")
    if find_prefixes(keys, T5_ANCHOR):
        parts.append("a T5 text encoder")
    if find_prefixes(keys, CLIP_ANCHOR):
        parts.append("a CLIP text encoder")
    if not parts:
        for fragment, family in _OTHER_FAMILIES:
            if any(fragment in k for k in keys):
                parts.append(family)
                break
    sample = ", ".join(f"'{k}'" for k in keys[:3]) or "no tensors"
    what = " and ".join(parts) if parts else "an unrecognised model"
    return f"{what} ({len(keys)} tensors, e.g. {sample})"
