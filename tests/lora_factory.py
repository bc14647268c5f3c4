"""Random LoRA files for the tiny FLUX test models, in the layouts trainers write, with the weight change
each makes, so a test can merge them by hand as the independent formula.

Two standard files: a kohya/ComfyUI one (lora_unet_<layer>, with alpha) on packed block layers and one
dense layer, and a diffusers/PEFT one (transformer.<module>.lora_A/lora_B) whose first two modules land
inside fused layers at their rows.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

import transformer_factory as tf

H = tf.TINY.hidden_size
RANK = 4
KOHYA_LAYERS = ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.0", "single_blocks.0.linear2", "img_in"]
# diffusers module -> (reference layer, first row, rows)
DIFFUSERS_MODULES = {
    "transformer.transformer_blocks.0.attn.to_k": ("double_blocks.0.img_attn.qkv", H, H),
    "transformer.single_transformer_blocks.1.proj_mlp": ("single_blocks.1.linear1", 3 * H, 4 * H),
    "transformer.transformer_blocks.1.ff.net.2": ("double_blocks.1.img_mlp.2", 0, H),
}
KOHYA, DIFFUSERS = "tiny-kohya.safetensors", "tiny-diffusers.safetensors"
STRENGTHS = {KOHYA: 0.8, DIFFUSERS: 1.0}


def low_rank(rows: int, cols: int, gen: torch.Generator, rank: int = RANK) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) whose product is about half the size of a layer's weights (std 1/sqrt(cols))."""
    up = torch.randn(rows, rank, generator=gen)
    down = torch.randn(rank, cols, generator=gen) * (0.5 / (cols * rank) ** 0.5)
    return up, down


def write_standard_loras(folder, seed: int = 11) -> dict[str, dict[str, list]]:
    """The kohya and diffusers files in `folder`; returns {file: {layer: [(first row, change at strength 1)]}}."""
    folder = Path(folder)
    shapes = {k: v.shape for k, v in tf.random_bfl_state_dict(tf.TINY).items()}
    gen = torch.Generator().manual_seed(seed)
    kohya, kohya_deltas = {}, {}
    for layer in KOHYA_LAYERS:
        rows, cols = shapes[layer + ".weight"]
        up, down = low_rank(rows, cols, gen)
        name = "lora_unet_" + layer.replace(".", "_")
        kohya.update({name + ".lora_up.weight": up, name + ".lora_down.weight": down,
                      name + ".alpha": torch.tensor(RANK / 2.0)})
        kohya_deltas.setdefault(layer, []).append((0, up @ down * 0.5))
    diffusers, diffusers_deltas = {}, {}
    for module, (layer, first, rows) in DIFFUSERS_MODULES.items():
        up, down = low_rank(rows, shapes[layer + ".weight"][1], gen)
        diffusers.update({module + ".lora_B.weight": up, module + ".lora_A.weight": down})
        diffusers_deltas.setdefault(layer, []).append((first, up @ down))
    save_file(kohya, str(folder / KOHYA))
    save_file(diffusers, str(folder / DIFFUSERS))
    return {KOHYA: kohya_deltas, DIFFUSERS: diffusers_deltas}


def merge(weights: dict[str, torch.Tensor], changes: dict[str, dict[str, list]],
          strengths: dict[str, float] = STRENGTHS) -> dict[str, torch.Tensor]:
    """float32 copies of `weights` with every file's changes added at its strength."""
    merged = {k: v.to(torch.float32, copy=True) for k, v in weights.items()}
    for file, strength in strengths.items():
        for layer, parts in changes[file].items():
            for first, delta in parts:
                merged[layer + ".weight"][first:first + delta.shape[0]] += strength * delta
    return merged


def write_demo_lora(path, layers=("double_blocks.0.img_attn.qkv", "single_blocks.0.linear2"), seed: int = 9,
                    boost: float = 4.0) -> Path:
    """A kohya-format LoRA for the demo transformer (flux_core.demo) on `layers`, `boost` times the usual
    size so a few steps of the tiny model show it."""
    from safetensors import safe_open

    from flux_core.demo import demo_model_files

    with safe_open(str(demo_model_files()["transformer"]), "pt") as f:
        shapes = {layer: f.get_slice(layer + ".weight").get_shape() for layer in layers}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer, (rows, cols) in shapes.items():
        up, down = low_rank(rows, cols, gen)
        stem = "lora_unet_" + layer.replace(".", "_")
        tensors.update({stem + ".lora_up.weight": up * boost, stem + ".lora_down.weight": down})
    save_file(tensors, str(path))
    return Path(path)
