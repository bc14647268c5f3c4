"""LoRAs on a flux_core model (the transformer, or CLIP-L), applied per call: y = linear(x) + (x @ D^T) @ U^T.

The weights are never changed, so the same path serves dense, fp8 and packed (GGUF/int8/fp8) layers,
removing or changing a LoRA restores the model exactly, and the cost is two thin matmuls per patched layer
(rank r against the layer's in + out sizes: about 1% of the layer's own work at rank 16 on FLUX's
3072-wide layers).

All LoRAs on one layer, and the row ranges that updates of fused layers fill (q/k/v in `qkv`), are folded
into one pair: D stacks every down matrix, U places every up matrix (times its scale and strength) at its
rows and columns. One forward hook function serves every layer; the pair lives in the layer as
non-persistent buffers, so state_dict() is unchanged and block streaming (which packs the blocks' tensors
once, before any LoRA) leaves it alone. The pair follows the input to its device and dtype on first use.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .files import LoraLayer

DOWN, UP = "flux_lora_down", "flux_lora_up"
_STATE = "_flux_loras"  # in the model's __dict__: hook handles and the summary of what is applied


def _add_lora(module: nn.Module, args, output):
    x = args[0]
    down, up = getattr(module, DOWN), getattr(module, UP)
    if down.device != x.device or down.dtype != x.dtype:  # once per device/dtype: kept where it was used
        down, up = down.to(x.device, x.dtype), up.to(x.device, x.dtype)
        setattr(module, DOWN, down)
        setattr(module, UP, up)
    return output + F.linear(F.linear(x, down), up).to(output.dtype)


def apply_loras(model: nn.Module, updates: Sequence[tuple[Sequence[LoraLayer], float]], tag=None,
                summary: list[dict] | None = None) -> list[dict]:
    """Replace the LoRAs on `model` (the transformer, or a text encoder) with `updates`: (layers read for
    this model, strength) pairs; an empty list removes them. `tag` and `summary` (what applied_loras
    reports) are kept with them until they are replaced or removed."""
    remove_loras(model)
    by_target: dict[str, list] = {}
    for layers, strength in updates:
        if float(strength) == 0.0:
            continue
        for layer in layers:
            by_target.setdefault(layer.target, []).append((layer, layer.scale * float(strength)))
    handles = []
    for target, parts in by_target.items():
        module = model.get_submodule(target)
        down, up = _fold(parts, module.out_features)
        module.register_buffer(DOWN, down, persistent=False)
        module.register_buffer(UP, up, persistent=False)
        handles.append(module.register_forward_hook(_add_lora))
    summary = list(summary or [])
    model.__dict__[_STATE] = {"handles": handles, "targets": list(by_target), "summary": summary, "tag": tag}
    return summary


def _fold(parts, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One (down, up) pair in float32 for every update of a layer: D = [D1; D2; ...], U = [s1 U1 | s2 U2 | ...]
    with each U_i on its rows."""
    down = torch.cat([layer.down for layer, _ in parts])
    up = torch.zeros(out_features, down.shape[0])
    col = 0
    for layer, scale in parts:
        rows = layer.rows or (0, out_features)
        rank = layer.down.shape[0]
        up[rows[0]:rows[1], col:col + rank] = layer.up * scale
        col += rank
    return down, up


def remove_loras(model: nn.Module) -> None:
    """Take every LoRA off `model`; it computes exactly what it did before they were applied."""
    state = model.__dict__.pop(_STATE, None)
    if not state:
        return
    for handle in state["handles"]:
        handle.remove()
    for target in state["targets"]:
        module = model.get_submodule(target)
        for name in (DOWN, UP):
            delattr(module, name)


def applied_tag(model: nn.Module):
    """The tag given to the apply_loras call whose LoRAs are on `model` now (None without any)."""
    state = model.__dict__.get(_STATE)
    return state["tag"] if state else None


def applied_loras(model: nn.Module) -> list[dict]:
    """The summary of the LoRAs on `model` (name, strength, layers), [] without any."""
    state = model.__dict__.get(_STATE)
    return list(state["summary"]) if state else []
