"""Transformer checkpoints in every layout, mapped to the reference names, and the config they imply.

Layouts: BFL single file (bare keys), ComfyUI's `model.diffusion_model.` prefix and all-in-one files,
diffusers (single file or sharded folder). fp8 and scaled fp8 weights are dequantized by the sources.
"""
from __future__ import annotations

import re

from ..errors import CheckpointError
from ..model import FluxParams, default_axes_dim
from .families import TRANSFORMER_BFL, TRANSFORMER_DIFFUSERS, describe, find_prefixes
from .reader import TensorFile
from .sources import Concat, FileTensor, Source, SwapHalves, is_quant_aux

_DIFFUSERS_GLOBAL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
}
_DIFFUSERS_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
_DIFFUSERS_DOUBLE_NORMS = {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
_DIFFUSERS_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_DIFFUSERS_SINGLE_NORMS = {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}


def _single_prefix(tf: TensorFile, anchor: str) -> str | None:
    prefixes = find_prefixes(tf.keys(), anchor)
    if len(prefixes) > 1:
        raise CheckpointError(tf.path, "the file holds more than one transformer", found=", ".join(prefixes))
    return prefixes[0] if prefixes else None


def transformer_sources(tf: TensorFile) -> dict[str, Source]:
    """Reference-named lazy sources for the transformer in `tf`, whatever its layout."""
    prefix = _single_prefix(tf, TRANSFORMER_BFL)
    if prefix is not None:
        return {k[len(prefix):]: FileTensor(tf, k) for k in tf.keys()
                if k.startswith(prefix) and not is_quant_aux(k)}
    prefix = _single_prefix(tf, TRANSFORMER_DIFFUSERS)
    if prefix is not None:
        return _diffusers_sources(tf, prefix)
    raise CheckpointError(tf.path, "this is not a FLUX transformer", found=describe(tf.keys()),
                          expected=f"keys like '{TRANSFORMER_BFL}' (reference/ComfyUI) or "
                                   f"'{TRANSFORMER_DIFFUSERS}' (diffusers)",
                          hint="FLUX transformer files go in models/diffusion_models; see the README's model table")


def _diffusers_sources(tf: TensorFile, prefix: str) -> dict[str, Source]:
    def src(name):
        return FileTensor(tf, prefix + name)

    present = {k[len(prefix):] for k in tf.keys() if k.startswith(prefix) and not is_quant_aux(k)}
    out: dict[str, Source] = {}

    def rename(old: str, new: str, table: dict, norms: dict, fused: dict):
        """Copy renamed Linear weights/biases and norm scales; concatenate fused projections."""
        for a, b in table.items():
            for p in ("weight", "bias"):
                if f"{old}{a}.{p}" in present:
                    out[f"{new}{b}.{p}"] = src(f"{old}{a}.{p}")
        for a, b in norms.items():
            if old + a in present:
                out[new + b] = src(old + a)
        for target, parts in fused.items():
            for p in ("weight", "bias"):
                names = [f"{old}{n}.{p}" for n in parts]
                if all(n in present for n in names):
                    out[f"{new}{target}.{p}"] = Concat([src(n) for n in names])

    rename("", "", _DIFFUSERS_GLOBAL, {}, {})
    for p in ("weight", "bias"):
        if f"norm_out.linear.{p}" in present:
            out[f"final_layer.adaLN_modulation.1.{p}"] = SwapHalves(src(f"norm_out.linear.{p}"))
    for i in _block_indices(present, "transformer_blocks"):
        rename(f"transformer_blocks.{i}.", f"double_blocks.{i}.", _DIFFUSERS_DOUBLE, _DIFFUSERS_DOUBLE_NORMS,
               {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")})
    for i in _block_indices(present, "single_transformer_blocks"):
        rename(f"single_transformer_blocks.{i}.", f"single_blocks.{i}.", _DIFFUSERS_SINGLE, _DIFFUSERS_SINGLE_NORMS,
               {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")})
    return out


def diffusers_linear_targets(params: FluxParams) -> dict[str, tuple[str, tuple[int, int] | None, bool]]:
    """diffusers Linear name -> (reference Linear name, output rows it fills or None for all, whether its
    two halves are swapped), from the same tables that convert diffusers checkpoints: for adapters (LoRA)
    written against diffusers module names."""
    hidden, mlp = params.hidden_size, params.mlp_hidden_dim
    q, k, v = (0, hidden), (hidden, 2 * hidden), (2 * hidden, 3 * hidden)
    out = {a: (b, None, False) for a, b in _DIFFUSERS_GLOBAL.items()}
    out["norm_out.linear"] = ("final_layer.adaLN_modulation.1", None, True)
    for i in range(params.depth):
        old, new = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        out.update({old + a: (new + b, None, False) for a, b in _DIFFUSERS_DOUBLE.items()})
        for names, target in ((("to_q", "to_k", "to_v"), "img_attn.qkv"),
                              (("add_q_proj", "add_k_proj", "add_v_proj"), "txt_attn.qkv")):
            out.update({f"{old}attn.{n}": (new + target, rows, False) for n, rows in zip(names, (q, k, v))})
    for i in range(params.depth_single_blocks):
        old, new = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        out.update({old + a: (new + b, None, False) for a, b in _DIFFUSERS_SINGLE.items()})
        out.update({f"{old}attn.{n}": (new + "linear1", rows, False) for n, rows in zip(("to_q", "to_k", "to_v"),
                                                                                        (q, k, v))})
        out[old + "proj_mlp"] = (new + "linear1", (3 * hidden, 3 * hidden + mlp), False)
    return out


def _block_indices(names, stem: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(stem)}\.(\d+)\.")
    return sorted({int(m.group(1)) for n in names if (m := pattern.match(n))})


def infer_params(sources: dict[str, Source], path) -> FluxParams:
    """The model configuration implied by the tensor shapes."""
    def shape(name):
        if name not in sources:
            raise CheckpointError(path, "the transformer weights are incomplete", found=f"no '{name}'",
                                  expected="a complete FLUX transformer")
        return sources[name].shape

    hidden, in_channels = shape("img_in.weight")
    # Head size and MLP width from the first double block, or the first single block of a model without any.
    if "double_blocks.0.img_attn.norm.query_norm.scale" in sources:
        head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
        mlp_hidden = shape("double_blocks.0.img_mlp.0.weight")[0]
        qkv_bias = "double_blocks.0.img_attn.qkv.bias" in sources
    else:
        head_dim = shape("single_blocks.0.norm.query_norm.scale")[0]
        mlp_hidden = shape("single_blocks.0.linear1.weight")[0] - 3 * hidden
        qkv_bias = True
    if hidden % head_dim:
        raise CheckpointError(path, "the shapes do not fit a FLUX transformer",
                              found=f"hidden size {hidden} with q/k norm size {head_dim}",
                              expected="a hidden size divisible by the head size")
    try:
        axes = default_axes_dim(head_dim)
    except ValueError as exc:
        raise CheckpointError(path, "the head size does not split into rotary axes", found=str(exc)) from None
    return FluxParams(
        in_channels=in_channels,
        out_channels=shape("final_layer.linear.weight")[0],
        vec_in_dim=shape("vector_in.in_layer.weight")[1],
        context_in_dim=shape("txt_in.weight")[1],
        hidden_size=hidden,
        mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // head_dim,
        depth=len(_block_indices(sources, "double_blocks")),
        depth_single_blocks=len(_block_indices(sources, "single_blocks")),
        axes_dim=axes,
        qkv_bias=qkv_bias,
        guidance_embed="guidance_in.in_layer.weight" in sources,
    )
