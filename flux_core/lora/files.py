"""LoRA files for the FLUX transformer: read, named in the reference's terms, checked against a model.

Recognised key layouts (safetensors only, like every model file of the pack):
- kohya / ComfyUI: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `.lora_up.weight`, `.alpha`
- reference names with a prefix (or none): `diffusion_model.single_blocks.3.linear1.lora_A.weight`, ...
- diffusers / PEFT (ai-toolkit, SimpleTuner, diffusers' trainers): `transformer.transformer_blocks.0.attn.to_q
  .lora_A.weight`, `.lora_B.weight`; projections that the reference fuses (q/k/v, the single blocks' MLP
  input) patch their rows of the fused layer
- OneTrainer: diffusers names with underscores, `lora_transformer_single_transformer_blocks_0_proj_out...`
- XLabs: `double_blocks.0.processor.qkv_lora1.down.weight` (qkv_lora1/proj_lora1 image stream, 2 text
  stream), `single_blocks.0.processor.qkv_lora` (linear1's q/k/v rows) and `proj_lora` (linear2)

CLIP-L layers (`lora_te1_`, `lora_te_`, `text_encoder.`) apply to the engine's CLIP-L when it is given; other
text-encoder layers (T5) are reported and left out. Other adapter kinds (DoRA, LoHa, LoKr, full weight
diffs) are refused by name.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..errors import FluxError

# (down suffix, up suffix) pairs, most common first
_PAIRS = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"),
          (".lora_A.default.weight", ".lora_B.default.weight"), (".lora.down.weight", ".lora.up.weight"),
          (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
          (".down.weight", ".up.weight"))  # XLabs (last: the suffixes above end the same way)
_ALPHA = ".alpha"
_OTHER_KINDS = {".dora_scale": "DoRA", ".hada_w1_a": "LoHa", ".lokr_w1": "LoKr", ".lokr_w1_a": "LoKr",
                ".diff": "a full weight diff", ".diff_b": "a full bias diff"}
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "unet.")
# CLIP-L layer names (Hugging Face's, as flux_core's CLIP has them) in kohya's and diffusers' spellings;
# an underscore prefix takes the name with underscores
_CLIP_PREFIXES = ("lora_te1_", "lora_te_", "text_encoder.")
_TEXT_ENCODER = re.compile(r"^(lora_te\d?_|text_encoder(_\d)?\.|te\d?\.|lora_clip|lora_t5)")


class LoraError(FluxError, ValueError):
    """A LoRA file that cannot be applied to this model; the message names the file and the reason."""

    def __init__(self, path, problem: str):
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class LoraLayer:
    """One low-rank update: W[rows] += scale * up @ down (rows None: the whole output)."""

    target: str                       # reference Linear name, e.g. "double_blocks.0.img_attn.qkv"
    rows: tuple[int, int] | None
    down: Tensor                      # (rank, in_features)
    up: Tensor                        # (len(rows) or out_features, rank)
    scale: float                      # alpha / rank, 1 without an alpha


@dataclass
class Lora:
    path: str
    layers: list[LoraLayer]                                     # the transformer's
    clip_layers: list[LoraLayer] = field(default_factory=list)  # CLIP-L's (read when a CLIP model is given)
    text_encoder_keys: list[str] = field(default_factory=list)  # recognised, not applied
    unknown_keys: list[str] = field(default_factory=list)       # not recognised, not applied

    @property
    def name(self) -> str:
        return Path(self.path).name

    def summary(self, strength: float) -> dict:
        """What an image's settings record of this LoRA."""
        entry = {"name": self.name, "strength": float(strength), "layers": len(self.layers)}
        if self.clip_layers:
            entry["clip_layers"] = len(self.clip_layers)
        return entry


def linear_shapes(model) -> dict[str, tuple[int, int]]:
    """Reference Linear name -> (out_features, in_features) for every linear layer of a flux_core Flux,
    plain, fp8 or packed."""
    return {name: (m.out_features, m.in_features) for name, m in model.named_modules()
            if isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int)}


def read_lora(path, model, clip=None) -> Lora:
    """The LoRA in `path` as updates to `model`'s linears (a flux_core Flux) and, given the CLIP-L model
    `clip`, to its linears; LoraError if it does not fit."""
    from ..checkpoints.reader import open_checkpoint
    from ..checkpoints.transformer import diffusers_linear_targets

    path = Path(path)
    if not path.is_file():
        raise LoraError(path, "no such LoRA file")
    if path.suffix.lower() != ".safetensors":
        raise LoraError(path, "LoRAs are read from .safetensors files only (pickled .pt/.ckpt files can run code)")
    shapes = linear_shapes(model)
    targets = _name_table(shapes, diffusers_linear_targets(model.params), model.params.hidden_size)
    clip_shapes = linear_shapes(clip) if clip is not None else {}
    clip_targets = _clip_name_table(clip_shapes)
    with open_checkpoint(path) as tf:
        keys = list(tf.keys())
        stems, leftovers = _group(keys)
        for key in leftovers:
            for suffix, kind in _OTHER_KINDS.items():
                if key.endswith(suffix):
                    raise LoraError(path, f"'{key}' is {kind}; the engine applies plain low-rank LoRAs only "
                                          "(ComfyUI's LoRA loaders read the other kinds)")
        lora = Lora(str(path), [])
        for stem, (down_key, up_key) in stems.items():
            if stem in clip_targets:
                found, into, layer_shapes = clip_targets[stem], lora.clip_layers, clip_shapes
            elif _TEXT_ENCODER.match(stem):
                lora.text_encoder_keys += [down_key, up_key]
                continue
            else:
                found, into, layer_shapes = _resolve(stem, targets), lora.layers, shapes
            if found is None:
                lora.unknown_keys += [down_key, up_key]
                continue
            target, rows, swapped = found
            down, up = tf.read(down_key).float(), tf.read(up_key).float()
            alpha = tf.read(stem + _ALPHA).float().item() if stem + _ALPHA in tf else None
            into.append(_layer(path, stem, target, rows, swapped, down, up, alpha, layer_shapes[target]))
        for key in leftovers:
            if not key.endswith(_ALPHA):
                (lora.text_encoder_keys if _TEXT_ENCODER.match(key) else lora.unknown_keys).append(key)
    if not lora.layers and not lora.clip_layers:
        what = (f"only text-encoder layers the engine does not patch ({len(lora.text_encoder_keys)} tensors)"
                if lora.text_encoder_keys
                else f"no layer of this FLUX transformer (keys like {', '.join(keys[:3]) or 'none'})")
        raise LoraError(path, f"the file holds {what}; nothing to apply")
    return lora


def _group(keys) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """stem -> (down key, up key) for every complete pair, and the keys in no pair."""
    stems, used = {}, set()
    keyset = set(keys)
    for key in keys:
        for down_suffix, up_suffix in _PAIRS:
            if key.endswith(down_suffix):
                stem = key[:-len(down_suffix)]
                if stem + up_suffix in keyset:
                    stems[stem] = (key, stem + up_suffix)
                    used.update((key, stem + up_suffix, stem + _ALPHA))
                break
    return stems, [k for k in keys if k not in used]


def _name_table(shapes: dict, diffusers: dict, hidden: int) -> dict[str, tuple[str, tuple[int, int] | None, bool]]:
    """Every spelling of a linear a LoRA may use -> (reference name, rows, halves swapped)."""
    table = {}
    for name in shapes:
        table[name] = table["lora_unet_" + name.replace(".", "_")] = (name, None, False)
    for name, target in diffusers.items():
        if target[0] in shapes:
            table.setdefault(name, target)
            table["lora_transformer_" + name.replace(".", "_")] = target
    table.update(_xlabs_names(shapes, hidden))
    return table


def _clip_name_table(shapes: dict) -> dict[str, tuple[str, None, bool]]:
    """Every spelling of a CLIP-L linear a LoRA may use -> (its name, all rows, not swapped)."""
    return {prefix + (name.replace(".", "_") if prefix.endswith("_") else name): (name, None, False)
            for name in shapes for prefix in _CLIP_PREFIXES}


# XLabs processor names: reference layer (inside a block) -> name
_XLABS = {"img_attn.qkv": "qkv_lora1", "img_attn.proj": "proj_lora1", "txt_attn.qkv": "qkv_lora2",
          "txt_attn.proj": "proj_lora2", "linear1": "qkv_lora", "linear2": "proj_lora"}


def _xlabs_names(shapes: dict, hidden: int) -> dict:
    table = {}
    for name in shapes:
        kind, _, rest = name.partition(".")
        index, _, layer = rest.partition(".")
        if kind in ("double_blocks", "single_blocks") and layer in _XLABS:
            rows = (0, 3 * hidden) if layer == "linear1" else None  # only linear1's q/k/v rows
            table[f"{kind}.{index}.processor.{_XLABS[layer]}"] = (name, rows, False)
    return table


def _resolve(stem: str, table: dict):
    if stem in table:
        return table[stem]
    for prefix in _PREFIXES:
        if stem.startswith(prefix) and stem[len(prefix):] in table:
            return table[stem[len(prefix):]]
    return None


def _layer(path, stem, target, rows, swapped, down, up, alpha, shape) -> LoraLayer:
    out_features, in_features = shape
    want_rows = out_features if rows is None else rows[1] - rows[0]
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise LoraError(path, f"'{stem}': down {list(down.shape)} and up {list(up.shape)} are not a low-rank pair")
    rank = down.shape[0]
    if down.shape[1] != in_features or up.shape[0] != want_rows:
        raise LoraError(path, f"'{stem}' updates a {up.shape[0]}x{down.shape[1]} weight but {target} here is "
                              f"{want_rows}x{in_features}: the LoRA was made for another model")
    if swapped:  # diffusers keeps (scale, shift) where the reference keeps (shift, scale)
        up = torch.cat(up.chunk(2, dim=0)[::-1])
    scale = 1.0 if alpha is None or not math.isfinite(alpha) else alpha / rank
    return LoraLayer(target, rows, down.contiguous(), up.contiguous(), scale)
