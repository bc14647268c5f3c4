"""Tiny random FLUX transformers with the real key layouts, and writers for every file layout we load.

Nothing here asks flux_core how a checkpoint looks: the BFL key/shape table is written out from the
reference (shared/reference/formats.md 2(a)), the diffusers files come from diffusers' own
FluxTransformer2DModel and its own save_pretrained, and the diffusers -> BFL conversion below is the
test's own, checked against ComfyUI and diffusers in test_transformer.py.

Head size is 128 so the reference rotary split 16/56/56 holds. Every parameter is random, with scales
chosen so that a mixed-up chunk (q/k/v, shift/scale, head split) moves the output by O(1):
matrices ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), norm scales ~ 1 + N(0, 0.1^2).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from flux_core.model import FluxParams

TINY = FluxParams(hidden_size=256, num_heads=2, depth=2, depth_single_blocks=2, context_in_dim=64, vec_in_dim=32,
                  axes_dim=[16, 56, 56])
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def rel_l2(a, b) -> float:
    """|a - b| / |b| over all elements, in float32."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def tiny_params(**overrides) -> FluxParams:
    """The tiny dev config, with overrides (guidance_embed=False for schnell, in_channels=128, depth=3, ...)."""
    return dataclasses.replace(TINY, axes_dim=list(TINY.axes_dim), **overrides)


# ------------------------------------------------------------------------------------------------
# BFL layout, from the reference table


def bfl_shapes(p: FluxParams) -> dict[str, tuple[int, ...]]:
    """Every tensor of a BFL-layout FLUX transformer and its shape (formats.md 2(a))."""
    h, mlp, hd = p.hidden_size, int(p.hidden_size * p.mlp_ratio), p.hidden_size // p.num_heads
    s: dict[str, tuple[int, ...]] = {}

    def linear(name, n_in, n_out, bias=True):
        s[f"{name}.weight"] = (n_out, n_in)
        if bias:
            s[f"{name}.bias"] = (n_out,)

    linear("img_in", p.in_channels, h)
    linear("time_in.in_layer", 256, h)
    linear("time_in.out_layer", h, h)
    linear("vector_in.in_layer", p.vec_in_dim, h)
    linear("vector_in.out_layer", h, h)
    if p.guidance_embed:
        linear("guidance_in.in_layer", 256, h)
        linear("guidance_in.out_layer", h, h)
    linear("txt_in", p.context_in_dim, h)
    for i in range(p.depth):
        for stream in ("img", "txt"):
            b = f"double_blocks.{i}.{stream}"
            linear(f"{b}_mod.lin", h, 6 * h)
            linear(f"{b}_attn.qkv", h, 3 * h, bias=p.qkv_bias)
            s[f"{b}_attn.norm.query_norm.scale"] = (hd,)
            s[f"{b}_attn.norm.key_norm.scale"] = (hd,)
            linear(f"{b}_attn.proj", h, h)
            linear(f"{b}_mlp.0", h, mlp)
            linear(f"{b}_mlp.2", mlp, h)
    for i in range(p.depth_single_blocks):
        b = f"single_blocks.{i}"
        linear(f"{b}.linear1", h, 3 * h + mlp)
        linear(f"{b}.linear2", h + mlp, h)
        s[f"{b}.norm.query_norm.scale"] = (hd,)
        s[f"{b}.norm.key_norm.scale"] = (hd,)
        linear(f"{b}.modulation.lin", h, 3 * h)
    linear("final_layer.linear", h, p.out_channels)
    linear("final_layer.adaLN_modulation.1", h, 2 * h)
    return s


def random_tensor(name: str, shape, gen: torch.Generator) -> torch.Tensor:
    """A random parameter for `name`, scaled by its role (see the module docstring)."""
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) == 2:
        return torch.randn(shape, generator=gen) / math.sqrt(shape[1])
    if leaf == "scale" or leaf == "weight":  # RMSNorm scales (BFL .scale, diffusers norm_q.weight, ...)
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    return 0.1 * torch.randn(shape, generator=gen)


def random_bfl_state_dict(p: FluxParams = TINY, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: random_tensor(k, shape, gen) for k, shape in bfl_shapes(p).items()}


# ------------------------------------------------------------------------------------------------
# diffusers, the independent oracle


def diffusers_config(p: FluxParams = TINY) -> dict:
    return dict(patch_size=1, in_channels=p.in_channels, out_channels=p.out_channels, num_layers=p.depth,
                num_single_layers=p.depth_single_blocks, attention_head_dim=p.hidden_size // p.num_heads,
                num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
                pooled_projection_dim=p.vec_in_dim, guidance_embeds=p.guidance_embed,
                axes_dims_rope=tuple(p.axes_dim))


def random_diffusers_model(p: FluxParams = TINY, seed: int = 0):
    """A diffusers FluxTransformer2DModel (fp32, eval) with every parameter randomized."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(**diffusers_config(p)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            param.copy_(random_tensor(name, param.shape, gen))
    return model


def diffusers_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The test's own diffusers -> BFL conversion (formats.md 2(c)); every input key must be used."""
    out, used = {}, set()

    def take(key):
        used.add(key)
        return sd[key]

    def move(old, new):
        for p in ("weight", "bias"):
            if f"{old}.{p}" in sd:
                out[f"{new}.{p}"] = take(f"{old}.{p}")

    for old, new in [("x_embedder", "img_in"), ("context_embedder", "txt_in"), ("proj_out", "final_layer.linear"),
                     ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
                     ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
                     ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
                     ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
                     ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
                     ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")]:
        move(old, new)
    for p in ("weight", "bias"):  # diffusers' AdaLayerNormContinuous is (scale, shift); BFL is (shift, scale)
        scale, shift = take(f"norm_out.linear.{p}").chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale], dim=0)

    n_double = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    for i in range(n_double):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for old, new in [("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
                         ("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                         ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                         ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2")]:
            move(d + old, b + new)
        for old, new in [("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                         ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")]:
            out[f"{b}{new}.scale"] = take(f"{d}attn.{old}.weight")
        for p in ("weight", "bias"):
            out[f"{b}img_attn.qkv.{p}"] = torch.cat([take(f"{d}attn.to_{x}.{p}") for x in "qkv"])
            out[f"{b}txt_attn.qkv.{p}"] = torch.cat([take(f"{d}attn.add_{x}_proj.{p}") for x in "qkv"])

    n_single = len({k.split(".")[1] for k in sd if k.startswith("single_transformer_blocks.")})
    for i in range(n_single):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        move(d + "norm.linear", b + "modulation.lin")
        move(d + "proj_out", b + "linear2")
        out[b + "norm.query_norm.scale"] = take(d + "attn.norm_q.weight")
        out[b + "norm.key_norm.scale"] = take(d + "attn.norm_k.weight")
        for p in ("weight", "bias"):
            out[f"{b}linear1.{p}"] = torch.cat([take(f"{d}attn.to_{x}.{p}") for x in "qkv"] + [take(f"{d}proj_mlp.{p}")])
    unused = set(sd) - used
    assert not unused, f"diffusers keys the test converter does not know: {sorted(unused)[:5]}"
    return {k: v.detach().clone() for k, v in out.items()}


def diffusers_forward(model, inputs: dict) -> torch.Tensor:
    """Run diffusers with our input dict (ids shared over the batch, as diffusers requires)."""
    with torch.no_grad():
        return model(hidden_states=inputs["img"], encoder_hidden_states=inputs["txt"],
                     pooled_projections=inputs["y"], timestep=inputs["timesteps"], img_ids=inputs["img_ids"][0],
                     txt_ids=inputs["txt_ids"][0], guidance=inputs["guidance"], return_dict=False)[0]


# ------------------------------------------------------------------------------------------------
# inputs


def make_inputs(p: FluxParams = TINY, seed: int = 1, batch: int = 2, rows: int = 3, cols: int = 5, txt_len: int = 7,
                t: float = 0.7, guidance: float | None = 3.5, dtype=torch.float32) -> dict:
    """Packed model inputs. img_ids are non-trivial: axis 0 = 1 (a reference-image index, so the first 16
    rotary dims turn too), rows offset by 2, columns offset by 3; txt_ids are 0 as in txt2img."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(rows, cols, 3)
    ids[..., 0] = 1.0
    ids[..., 1] = torch.arange(rows)[:, None] + 2.0
    ids[..., 2] = torch.arange(cols)[None, :] + 3.0
    out = dict(
        img=torch.randn(batch, rows * cols, p.in_channels, generator=gen),
        img_ids=ids.reshape(1, rows * cols, 3).repeat(batch, 1, 1),
        txt=torch.randn(batch, txt_len, p.context_in_dim, generator=gen),
        txt_ids=torch.zeros(batch, txt_len, 3),
        timesteps=torch.full((batch,), t),
        y=torch.randn(batch, p.vec_in_dim, generator=gen),
        guidance=torch.full((batch,), guidance) if guidance is not None else None,
    )
    return {k: (v.to(dtype) if v is not None and k not in ("img_ids", "txt_ids") else v) for k, v in out.items()}


def run_flux(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs["img"], inputs["img_ids"], inputs["txt"], inputs["txt_ids"], inputs["timesteps"],
                     inputs["y"], inputs["guidance"])


# ------------------------------------------------------------------------------------------------
# file writers (each returns the path it wrote)


def write_bfl(sd: dict, path, prefix: str = "", metadata: dict | None = None) -> Path:
    """BFL keys, bare (prefix "") or ComfyUI's `model.diffusion_model.`."""
    path = Path(path)
    save_file({prefix + k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def comfy_junk(seed: int = 5) -> dict[str, torch.Tensor]:
    """Text-encoder and VAE tensors of a ComfyUI all-in-one checkpoint (names real, sizes tiny)."""
    gen = torch.Generator().manual_seed(seed)
    names = {
        "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight": ((16, 8), torch.float16),
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": ((8, 8), torch.float16),
        "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": ((8,), torch.float16),
        "text_encoders.clip_l.logit_scale": ((), torch.float32),
        "text_encoders.t5xxl.transformer.shared.weight": ((16, 8), torch.float8_e4m3fn),
        "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight": ((8, 8), torch.float8_e4m3fn),
        "text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight": ((8,), torch.float8_e4m3fn),
        "text_encoders.t5xxl.logit_scale": ((), torch.float32),
        "vae.encoder.conv_in.weight": ((4, 3, 3, 3), torch.float32),
        "vae.decoder.conv_in.weight": ((4, 16, 3, 3), torch.float32),
        "vae.decoder.conv_out.bias": ((3,), torch.float32),
    }
    return {k: torch.randn(shape, generator=gen).to(dt) for k, (shape, dt) in names.items()}


def write_comfy_all_in_one(sd: dict, path) -> Path:
    """`model.diffusion_model.<BFL key>` plus CLIP-L, T5 and VAE tensors in one file."""
    path = Path(path)
    full = {"model.diffusion_model." + k: v.contiguous() for k, v in sd.items()}
    full.update(comfy_junk())
    save_file(full, str(path))
    return path


def write_diffusers_single(model, path) -> Path:
    """One diffusers-layout .safetensors file straight from the diffusers model's own state dict."""
    path = Path(path)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def write_diffusers_sharded(model, folder, max_shard_size: str = "4MB") -> Path:
    """A diffusers folder written by diffusers itself: shards plus diffusion_pytorch_model.safetensors.index.json."""
    folder = Path(folder)
    model.save_pretrained(str(folder), max_shard_size=max_shard_size, safe_serialization=True)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    assert index.exists(), f"diffusers wrote no shard index into {folder}: {sorted(p.name for p in folder.iterdir())}"
    assert len(set(json.loads(index.read_text())["weight_map"].values())) > 1, "expected several shards"
    return folder


# ------------------------------------------------------------------------------------------------
# fp8 flavours: each returns (tensors to store, reference fp32 tensors the loader must reproduce exactly)


def fp8_state_dict(sd: dict, dtype) -> tuple[dict, dict]:
    """Plain fp8: every tensor cast, biases and norm scales included (as Comfy-Org's fp8 checkpoint)."""
    stored = {k: v.to(dtype) for k, v in sd.items()}
    return stored, {k: v.float() for k, v in stored.items()}


def _quantize(w: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (w.abs().amax().float() / FP8_MAX[dtype]).reshape(())
    return (w.float() / scale).to(dtype), scale


def scaled_fp8_state_dict(sd: dict, flavour: str = "legacy", dtype=torch.float8_e4m3fn, rest_dtype=torch.bfloat16,
                          fp8_biases: bool = False) -> tuple[dict, dict, dict | None]:
    """ComfyUI's scaled fp8. Every Linear weight becomes fp8 with a float32 scalar scale; the rest is bf16.

    legacy: `scaled_fp8` marker + `<layer>.scale_weight` (+ `<layer>.scale_input` = 1, ignored for weights).
    mixed:  `<layer>.weight_scale` + `_quantization_metadata` header metadata naming every quantized layer.
    fp8_biases: store the biases of quantized layers as plain (unscaled) fp8, which is how ComfyUI 0.3.75's
    legacy scaled_fp8_ops holds them in memory whatever the file says.
    Returns (stored tensors, reference fp32 weights, header metadata or None).
    """
    stored, ref, layers = {}, {}, {}
    quantized = {k[: -len(".weight")] for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2}
    for k, v in sd.items():
        layer, _, leaf = k.rpartition(".")
        if leaf == "weight" and layer in quantized:
            q, scale = _quantize(v, dtype)
            stored[k] = q
            ref[k] = q.float() * scale
            if flavour == "legacy":
                stored[layer + ".scale_weight"] = scale
                stored[layer + ".scale_input"] = torch.ones((), dtype=torch.float32)
            elif flavour == "mixed":
                stored[layer + ".weight_scale"] = scale
                layers[layer] = {"format": "float8_e4m3fn"}
            else:
                raise ValueError(flavour)
        else:
            stored[k] = v.to(dtype if fp8_biases and leaf == "bias" and layer in quantized else rest_dtype)
            ref[k] = stored[k].float()
    metadata = None
    if flavour == "legacy":
        stored["scaled_fp8"] = torch.empty(0, dtype=dtype)
    else:
        metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    return stored, ref, metadata


# ------------------------------------------------------------------------------------------------
# a reference model with given weights (built by the code under test, filled strictly)


def flux_from_state_dict(sd: dict, p: FluxParams = TINY):
    """Our Flux with exactly these weights (strict), for comparing a loaded file against known weights."""
    from flux_core.model import Flux

    model = Flux(p).eval()
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model
