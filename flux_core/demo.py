"""Tiny random weights with the real file layouts, so the whole path runs on a CPU with no downloads.

The files are written once into a cache folder and then loaded through the same loaders as real
weights; the images they give are noise.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .model import Flux, FluxParams

# Widths chain like the real model: T5 d_model -> context_in_dim, CLIP hidden -> vec_in_dim.
TINY_FLUX = FluxParams(hidden_size=256, num_heads=2, depth=2, depth_single_blocks=2, context_in_dim=64,
                       vec_in_dim=64, axes_dim=[16, 56, 56])
# Bumped when the demo models change, so stale cached files are rebuilt.
DEMO_VERSION = 4
DEMO_MARKER = "demo random weights"  # in each file's safetensors metadata under "flux_core"
DEMO_FILES = {"transformer": "flux1-dev-demo.safetensors", "autoencoder": "ae-demo.safetensors",
              "t5": "t5xxl-demo.safetensors", "clip": "clip_l-demo.safetensors",
              "tiny_autoencoder": "ae-tiny-demo.safetensors", "lora": "flux-lora-demo.safetensors"}


def default_cache_dir() -> Path:
    return Path(os.environ.get("FLUX_DEMO_DIR", Path(__file__).resolve().parent.parent / ".cache" / "demo"))


def _random_modules() -> dict[str, torch.nn.Module]:
    # "autoencoder" keeps the real size: ComfyUI builds FLUX's autoencoder with fixed widths and the demo
    # files also feed the pack's nodes. The engine's own demo decodes with the tiny one, 10x faster on a CPU.
    from .autoencoder import FLUX_AE, TINY_AE, AutoEncoder
    from .text_encoders.clip import TINY_CLIP, CLIPTextModel
    from .text_encoders.t5 import TINY_T5, T5Encoder

    torch.manual_seed(0)
    return {"transformer": Flux(TINY_FLUX), "autoencoder": AutoEncoder(FLUX_AE), "t5": T5Encoder(TINY_T5),
            "clip": CLIPTextModel(TINY_CLIP), "tiny_autoencoder": AutoEncoder(TINY_AE)}


def demo_model_files(cache_dir=None) -> dict[str, Path]:
    """Paths of the tiny random model files, written on first use."""
    from safetensors.torch import save_file

    folder = (Path(cache_dir) if cache_dir else default_cache_dir()) / f"v{DEMO_VERSION}"
    paths = {role: folder / name for role, name in DEMO_FILES.items()}
    if all(p.exists() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    modules = _random_modules()
    files = {role: module.state_dict() for role, module in modules.items()}
    files["lora"] = _demo_lora(modules["transformer"], modules["clip"])
    for role, state in files.items():
        state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in state.items()}
        tmp = paths[role].with_suffix(".part")
        save_file(state, tmp, metadata={"flux_core": DEMO_MARKER})
        os.replace(tmp, paths[role])
    return paths


def _demo_lora(transformer, clip) -> dict[str, torch.Tensor]:
    """A rank-4 kohya-format LoRA on the demo transformer's attention inputs and CLIP-L's MLPs, so graphs and
    commands with a LoRA run on demo weights too."""
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for prefix, model, leaves in (("lora_unet_", transformer, ("qkv", "linear1")), ("lora_te1_", clip, ("fc1",))):
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in leaves:
                stem = prefix + name.replace(".", "_")
                tensors[stem + ".lora_down.weight"] = torch.randn(4, module.in_features, generator=gen) / 8
                tensors[stem + ".lora_up.weight"] = torch.randn(module.out_features, 4, generator=gen) / module.in_features ** 0.5
                tensors[stem + ".alpha"] = torch.tensor(4.0)
    return tensors
