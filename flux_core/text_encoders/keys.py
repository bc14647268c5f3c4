"""Text-encoder checkpoints in every layout, mapped to our parameter names, and the configs they imply.

T5 layouts: bare HF/ComfyUI keys (shared.weight and/or encoder.embed_tokens.weight + encoder.*), the
ComfyUI all-in-one prefix `text_encoders.t5xxl.transformer.`, HF sharded folders, diffusers model roots
(`text_encoder_2/`). CLIP: with or without `text_model.`, `text_encoders.clip_l.transformer.`, HF folders
(`text_encoder/`). Storage dtypes fp32/fp16/bf16, plain fp8, and ComfyUI's scaled fp8 are all handled by
the sources, which dequantize as they read.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..checkpoints.families import CLIP_ANCHOR, T5_ANCHOR, describe, find_prefixes
from ..checkpoints.reader import TensorFile
from ..checkpoints.sources import FileTensor, Source, is_quant_aux
from ..errors import CheckpointError
from .clip import CLIPConfig, heads_for
from .t5 import T5Config

# Keys that are never part of FLUX's text encoders.
_CLIP_IGNORED = ("text_projection", "logit_scale", "position_ids")
# Sub-folders of a diffusers model root holding each encoder.
DIFFUSERS_FOLDERS = {"t5": "text_encoder_2", "clip": "text_encoder"}


def resolve_folder(path, which: str) -> Path:
    """A diffusers model root stands for its encoder's sub-folder; anything else is used as given."""
    path = Path(path).expanduser()
    sub = path / DIFFUSERS_FOLDERS[which]
    if path.is_dir() and sub.is_dir():
        return sub
    return path


def _pick_prefix(tf: TensorFile, anchor: str, preferred: str, what: str) -> str | None:
    prefixes = find_prefixes(tf.keys(), anchor)
    if len(prefixes) > 1:
        # e.g. an SD3-style file with several encoders: take the one FLUX uses, by its ComfyUI name
        chosen = [p for p in prefixes if preferred in p]
        if len(chosen) != 1:
            raise CheckpointError(tf.path, f"the file holds several {what}s and none is marked as FLUX's",
                                  found=", ".join(repr(p) for p in prefixes),
                                  expected=f"one {what}, or one under a prefix containing '{preferred}'")
        return chosen[0]
    return prefixes[0] if prefixes else None


def t5_sources(tf: TensorFile) -> dict[str, Source]:
    """Our T5 parameter names -> lazy sources in `tf`."""
    prefix = _pick_prefix(tf, T5_ANCHOR, "t5xxl", "T5 encoder")
    if prefix is None:
        swapped = find_prefixes(tf.keys(), CLIP_ANCHOR)
        raise CheckpointError(tf.path, "this is not a T5 text encoder", found=describe(tf.keys()),
                              expected=f"keys like '{T5_ANCHOR}' and 'shared.weight' "
                                       "(t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn*.safetensors or text_encoder_2/)",
                              hint="the T5 and CLIP files look swapped" if swapped else
                              "T5-XXL files go in models/text_encoders; see the README's model table")
    out: dict[str, Source] = {}
    for key in tf.keys():
        if not key.startswith(prefix) or is_quant_aux(key):
            continue
        name = key[len(prefix):]
        if name.startswith("encoder.") and name != "encoder.embed_tokens.weight":
            out[name] = FileTensor(tf, key)
    # HF ties encoder.embed_tokens to shared; files hold either or both
    for name in ("shared.weight", "encoder.embed_tokens.weight"):
        if prefix + name in tf:
            out["shared.weight"] = FileTensor(tf, prefix + name)
            break
    if "shared.weight" not in out:
        raise CheckpointError(tf.path, "the T5 token embedding is missing", found=describe(tf.keys()),
                              expected=f"'{prefix}shared.weight' or '{prefix}encoder.embed_tokens.weight'")
    return out


def clip_sources(tf: TensorFile) -> dict[str, Source]:
    """Our CLIP parameter names (text_model.*) -> lazy sources in `tf`."""
    prefix = _pick_prefix(tf, CLIP_ANCHOR, "clip_l", "CLIP text encoder")
    if prefix is None:
        swapped = find_prefixes(tf.keys(), T5_ANCHOR)
        raise CheckpointError(tf.path, "this is not a CLIP text encoder", found=describe(tf.keys()),
                              expected=f"keys like 'text_model.{CLIP_ANCHOR}' "
                                       "(clip_l.safetensors or text_encoder/)",
                              hint="the T5 and CLIP files look swapped" if swapped else
                              "CLIP-L files go in models/text_encoders; see the README's model table")
    out: dict[str, Source] = {}
    for key in tf.keys():
        if not key.startswith(prefix) or is_quant_aux(key):
            continue
        name = key[len(prefix):]
        if name.rsplit(".", 1)[-1] in _CLIP_IGNORED or name.split(".", 1)[0] in _CLIP_IGNORED:
            continue
        out["text_model." + name] = FileTensor(tf, key)
    return out


def _shape(sources, name, path, what):
    if name not in sources:
        raise CheckpointError(path, f"the {what} weights are incomplete", found=f"no '{name}'",
                              expected=f"a complete {what}")
    return tuple(sources[name].shape)


def _layer_count(sources, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({int(m.group(1)) for n in sources if (m := rx.match(n))})


def infer_t5_config(sources: dict[str, Source], path) -> T5Config:
    """Widths from the weights; heads from the relative-bias table, whose columns are one per head."""
    what = "T5 encoder"
    attn = "encoder.block.0.layer.0.SelfAttention."
    if "encoder.block.0.layer.1.DenseReluDense.wi.weight" in sources:
        raise CheckpointError(path, "this T5 has an ungated feed-forward (T5 v1.0 / original T5)",
                              expected="a T5 v1.1 encoder (wi_0/wi_1), as FLUX uses T5-XXL v1.1")
    vocab, d_model = _shape(sources, "shared.weight", path, what)
    buckets, heads = _shape(sources, attn + "relative_attention_bias.weight", path, what)
    inner = _shape(sources, attn + "q.weight", path, what)[0]
    d_ff = _shape(sources, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", path, what)[0]
    if heads <= 0 or inner % heads:
        raise CheckpointError(path, f"the shapes do not fit a {what}",
                              found=f"attention width {inner} with {heads} relative-bias heads",
                              expected="an attention width divisible by the number of heads")
    layers = _layer_count(sources, r"^encoder\.block\.(\d+)\.")
    return T5Config(d_model=d_model, d_ff=d_ff, d_kv=inner // heads, num_heads=heads, num_layers=layers,
                    vocab_size=vocab, num_buckets=buckets)


def infer_clip_config(sources: dict[str, Source], path) -> CLIPConfig:
    """Widths from the weights; heads by the 64-wide-head rule (clip.heads_for)."""
    what = "CLIP text encoder"
    vocab, hidden = _shape(sources, "text_model.embeddings.token_embedding.weight", path, what)
    positions = _shape(sources, "text_model.embeddings.position_embedding.weight", path, what)[0]
    inter = _shape(sources, "text_model.encoder.layers.0.mlp.fc1.weight", path, what)[0]
    heads = heads_for(hidden)
    if hidden % heads:
        raise CheckpointError(path, f"the shapes do not fit a {what}", found=f"hidden size {hidden}",
                              expected="a hidden size that is a multiple of 64 (or below 64)")
    layers = _layer_count(sources, r"^text_model\.encoder\.layers\.(\d+)\.")
    return CLIPConfig(hidden_size=hidden, intermediate_size=inter, num_heads=heads, num_layers=layers,
                      vocab_size=vocab, max_positions=positions)
