"""The same random FLUX weights as three transformers: flux_core's Flux, diffusers' FluxTransformer2DModel and
ComfyUI's own comfy.ldm.flux.model.Flux, for timing them side by side (bench/transformer_eval.py,
bench/gpu_end_to_end.py).

All three share the very same weight tensors where the layouts agree (diffusers' q/k/v are row views of the
fused BFL matrices), so three models cost one set of weights in memory. Weights are built on the target
device in the target dtype, so a full-size 12B model never needs a file.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
for extra in (ROOT, ROOT / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from flux_core.model import Flux, FluxParams  # noqa: E402


def bfl_shapes(p: FluxParams) -> dict[str, tuple[int, ...]]:
    """Every tensor of a BFL-layout transformer and its shape, read off our model built on meta."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Flux(p).state_dict().items()}


@torch.no_grad()
def random_bfl_state_dict(p: FluxParams, seed: int = 0, device="cpu", dtype=torch.float32) -> dict:
    """Random weights: matrices ~ N(0, 1/fan_in), vectors ~ 0.1 N(0, 1) (+1 for norm scales).

    Drawn with a seeded generator on `device`, one tensor at a time, straight in `dtype`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, shape in bfl_shapes(p).items():
        t = torch.empty(shape, device=device, dtype=dtype)
        t.normal_(0.0, 1.0 / math.sqrt(shape[1]) if len(shape) == 2 else 0.1, generator=gen)
        if name.endswith(".scale"):
            t += 1.0
        out[name] = t
    return out


def ours(sd: dict, p: FluxParams) -> Flux:
    with torch.device("meta"):
        model = Flux(p)
    model.load_state_dict(sd, assign=True, strict=True)
    return model.eval().requires_grad_(False)


def bfl_to_diffusers(sd: dict, p: FluxParams) -> dict:
    """BFL names -> diffusers names; q/k/v (and the single blocks' MLP input) become row views, no copies."""
    out = {}
    h = p.hidden_size

    def move(old, new):
        for leaf in ("weight", "bias"):
            if f"{old}.{leaf}" in sd:
                out[f"{new}.{leaf}"] = sd[f"{old}.{leaf}"]

    def split(old, news, sizes):
        for leaf in ("weight", "bias"):
            if f"{old}.{leaf}" in sd:
                for new, part in zip(news, sd[f"{old}.{leaf}"].split(sizes, dim=0)):
                    out[f"{new}.{leaf}"] = part

    move("img_in", "x_embedder")
    move("txt_in", "context_embedder")
    move("final_layer.linear", "proj_out")
    for bfl, dif in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"), ("guidance_in", "guidance_embedder")):
        move(f"{bfl}.in_layer", f"time_text_embed.{dif}.linear_1")
        move(f"{bfl}.out_layer", f"time_text_embed.{dif}.linear_2")
    for leaf in ("weight", "bias"):  # BFL (shift, scale); diffusers (scale, shift)
        shift, scale = sd[f"final_layer.adaLN_modulation.1.{leaf}"].chunk(2, dim=0)
        out[f"norm_out.linear.{leaf}"] = torch.cat([scale, shift], dim=0)
    for i in range(p.depth):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for old, new in (("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
                         ("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
                         ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
                         ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2")):
            move(b + old, d + new)
        for old, new in (("img_attn.norm.query_norm", "norm_q"), ("img_attn.norm.key_norm", "norm_k"),
                         ("txt_attn.norm.query_norm", "norm_added_q"), ("txt_attn.norm.key_norm", "norm_added_k")):
            out[f"{d}attn.{new}.weight"] = sd[f"{b}{old}.scale"]
        split(b + "img_attn.qkv", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"], [h, h, h])
        split(b + "txt_attn.qkv", [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"], [h, h, h])
    for i in range(p.depth_single_blocks):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        move(b + "modulation.lin", d + "norm.linear")
        move(b + "linear2", d + "proj_out")
        out[d + "attn.norm_q.weight"] = sd[b + "norm.query_norm.scale"]
        out[d + "attn.norm_k.weight"] = sd[b + "norm.key_norm.scale"]
        split(b + "linear1", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"],
              [h, h, h, int(h * p.mlp_ratio)])
    return out


def diffusers_config(p: FluxParams) -> dict:
    return dict(patch_size=1, in_channels=p.in_channels, out_channels=p.out_channels, num_layers=p.depth,
                num_single_layers=p.depth_single_blocks, attention_head_dim=p.head_dim, num_attention_heads=p.num_heads,
                joint_attention_dim=p.context_in_dim, pooled_projection_dim=p.vec_in_dim,
                guidance_embeds=p.guidance_embed, axes_dims_rope=tuple(p.axes_dim))


def diffusers_model(sd: dict, p: FluxParams):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**diffusers_config(p))
    model.load_state_dict(bfl_to_diffusers(sd, p), assign=True, strict=True)
    return model.eval().requires_grad_(False)


def comfy_model(sd: dict, p: FluxParams, attention: str = "default"):
    """ComfyUI 0.3.75's Flux with these weights. attention: "default" keeps the attention function ComfyUI
    chose at import for this device (sub-quadratic on a CPU); "pytorch" is its SDPA one
    (--use-pytorch-cross-attention)."""
    from comfy_import import import_comfy

    comfy = import_comfy()
    import comfy.ldm.flux.math as flux_math
    import comfy.ldm.modules.attention as host_attention

    first = next(iter(sd.values()))
    with torch.device("meta"):
        model = comfy.ldm.flux.model.Flux(
            operations=comfy.ops.disable_weight_init, dtype=first.dtype, device="meta",
            in_channels=p.in_channels // 4, out_channels=p.out_channels // 4, patch_size=2, vec_in_dim=p.vec_in_dim,
            context_in_dim=p.context_in_dim, hidden_size=p.hidden_size, mlp_ratio=p.mlp_ratio, num_heads=p.num_heads,
            depth=p.depth, depth_single_blocks=p.depth_single_blocks, axes_dim=list(p.axes_dim), theta=p.theta,
            qkv_bias=p.qkv_bias, guidance_embed=p.guidance_embed)
    model.load_state_dict(sd, assign=True, strict=True)
    chosen = {"default": host_attention.optimized_attention, "pytorch": host_attention.attention_pytorch}[attention]
    return model.eval().requires_grad_(False), flux_math, chosen


def make_inputs(p: FluxParams, image_size: int, txt_len: int, device, dtype, batch: int = 1, seed: int = 1) -> dict:
    """Packed inputs for a square image: (image_size / 16)^2 image tokens with real row/column ids."""
    side = image_size // 16
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.zeros(side, side, 3, device=device)
    ids[..., 1] = torch.arange(side, device=device)[:, None]
    ids[..., 2] = torch.arange(side, device=device)[None, :]
    return dict(
        img=torch.randn(batch, side * side, p.in_channels, generator=gen, device=device).to(dtype),
        img_ids=ids.reshape(1, -1, 3).repeat(batch, 1, 1),
        txt=torch.randn(batch, txt_len, p.context_in_dim, generator=gen, device=device).to(dtype),
        txt_ids=torch.zeros(batch, txt_len, 3, device=device),
        timesteps=torch.full((batch,), 0.7, device=device, dtype=dtype),
        y=torch.randn(batch, p.vec_in_dim, generator=gen, device=device).to(dtype),
        guidance=torch.full((batch,), 3.5, device=device, dtype=dtype),
    )


def run_ours(model, x: dict):
    return model(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"], x["guidance"])


def run_diffusers(model, x: dict):
    return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                 timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0], guidance=x["guidance"],
                 return_dict=False)[0]


def run_comfy(handle, x: dict):
    """ComfyUI's forward_orig on packed tokens, with the chosen host attention function swapped in for the call."""
    model, flux_math, chosen = handle
    saved = flux_math.optimized_attention
    flux_math.optimized_attention = chosen
    try:
        return model.forward_orig(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"],
                                  x["guidance"], transformer_options={})
    finally:
        flux_math.optimized_attention = saved
