"""LoRA (and every other host weight patch) on the pack's packed Linears (GGUF blocks, int8, fp8).

The host applies a weight patch by rewriting the layer's `weight` when it loads the model, or, for layers it
streams in low-VRAM mode, by adding a per-call function to the layer's `weight_function`. Packed layers have
no dense `weight` to rewrite, so they take every patch the second way, whatever the host's memory mode:

- the packed Linear lists an empty `<layer>.weight` in its state dict, so the host's LoRA key mapping and
  `add_patches` accept patches for it (quantized_ops.py);
- an ON_LOAD callback (the host's `CallbacksMP` extension point), registered on every MODEL the pack loads
  packed and inherited by its clones, hands each packed layer its patches after each load;
- the layer applies them to the weight it dequantizes in forward, in float32 math, unless the host already
  added a per-call patch for the same key (its low-VRAM path), so a patch never applies twice.

The packed bytes are never rewritten: unloading a LoRA (or switching to a clone without it) restores the
original model exactly.
"""
from __future__ import annotations

import logging

import torch

CALLBACK_KEY = "flux_juiced_packed_patches"

log = logging.getLogger(__name__)


class PackedWeightPatch:
    """The host's patches for one packed layer's weight, applied to its dequantized weight per call."""

    def __init__(self, key: str, patches: list):
        import comfy.lora  # bound here, at load time, not in every layer's forward

        self.key, self.patches = key, patches
        self._calculate = comfy.lora.calculate_weight

    def __call__(self, weight):
        # The host's adapters update the weight in place: the dequantized weight is a fresh tensor per call.
        return self._calculate(self.patches, weight, self.key, intermediate_dtype=torch.float32)

    def applied_by_host(self, weight_function) -> bool:
        """Whether the host already put a per-call patch for this key on the layer (its low-VRAM path)."""
        return any(getattr(f, "key", None) == self.key for f in weight_function)


def enable(patcher) -> bool:
    """Let the host's weight patches (LoRA loaders and others) reach the packed layers of `patcher`'s model,
    and of every clone made from it. False (and a warning) on a host without load callbacks."""
    try:
        from comfy.patcher_extension import CallbacksMP
        on_load = CallbacksMP.ON_LOAD
    except (ImportError, AttributeError):
        log.warning("this ComfyUI has no model load callbacks: LoRAs will not change quantized layers")
        return False
    patcher.add_callback_with_key(on_load, CALLBACK_KEY, hand_out_patches)
    return True


def hand_out_patches(patcher, *_load_args, **_load_kwargs):
    """ON_LOAD callback: give each packed layer the patches the loading MODEL holds for its weight (none
    clears what an earlier clone left)."""
    patched = 0
    for name, module in patcher.model.named_modules():
        if getattr(module, "qweight", None) is None or not hasattr(module, "packed_weight_patch"):
            continue
        key = f"{name}.weight"
        patches = patcher.patches.get(key)
        module.packed_weight_patch = PackedWeightPatch(key, patches) if patches else None
        patched += bool(patches)
    if patched:
        log.info("weight patches on %d quantized layers, applied as each layer is dequantized", patched)
