"""Quantized weight storage inside the host: its own FLUX model class built with an operations class
(the host's `custom_operations` extension point) whose Linear keeps GGUF blocks / int8 / fp8 weights
packed and dequantizes them in forward, layer by layer, to the dtype the host computes in.

The engine does the reading and packing (flux_core.quant); the state dict handed to the host carries each
packed layer as `qweight`, `scale`, `bias` plus a `quant_spec` entry describing it. Dense layers behave
exactly as the host's manual_cast Linear. The host's memory accounting sees the packed bytes, so it
budgets VRAM for the quantized size.

fp8 matmuls: while `fp8_matmul_enabled(device)` is in effect (the speed node holds it around each model
call of a MODEL it enabled them on, host_precision.py), the packed fp8 block linears (q/k/v, projections,
MLPs: the per-token layers the engine's fp8 matmuls cover, named by BLOCK_LINEAR) compute
``scaled_mm(quantize_activations(x), e4m3 weight, row scales)`` from their stored bytes instead of
dequantizing. Any other call or layer (the modulation linears see one row per image), a non-bf16 input,
another device or weight patches keep the dequantize path.

LoRA and other host weight patches reach packed layers through packed_lora.py: a packed layer lists an
empty `weight` in its state dict (so the host maps LoRA keys to it) and applies its patches to the weight it
dequantizes.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import re
from dataclasses import dataclass

# The host FLUX's per-token block linears by state-dict prefix (the engine's fp8_linear.block_linears).
BLOCK_LINEAR = re.compile(r"(?:^|\.)(?:double_blocks\.\d+\.(?:img|txt)_(?:attn\.(?:qkv|proj)|mlp\.[02])"
                          r"|single_blocks\.\d+\.linear[12])\.$")
# The device on which the packed fp8 block linears run fp8 matmuls in the current model call, or None. A
# plain value rather than a set of layers: compiled blocks guard on it, and guarding on module identities
# would compile every block separately.
_FP8_MATMULS: contextvars.ContextVar = contextvars.ContextVar("flux_juiced_fp8_matmuls", default=None)


@dataclass
class PackedState:
    state: dict        # for the model's load_model_weights: dense tensors and packed layers
    shapes: dict       # every tensor under its reference name with its logical shape (meta), for detection
    operations: type   # the operations class to build the host model with


def packed_state(plan, storage: str, dtype=None) -> PackedState | None:
    """The packed tensors of a transformer load plan, or None when nothing would stay packed (plain files
    with storage "auto"): then the host's usual dense path applies. Dense tensors are converted to `dtype`,
    or kept as stored with None (the host converts them to its compute dtype as it loads them)."""
    import torch

    from ..flux_core.quant.loading import choose_storage, materialize_quantized, packed_state_dict

    if not choose_storage(plan.module, plan.sources, storage):
        return None
    shapes = {name: torch.empty(src.shape, dtype=dtype or torch.bfloat16, device="meta")
              for name, src in plan.sources.items()}
    model = materialize_quantized(plan, device="cpu", dtype=dtype, weights=storage)
    return PackedState(packed_state_dict(model), shapes, quantized_operations())


@contextlib.contextmanager
def fp8_matmul_enabled(device):
    """fp8 matmuls in the packed fp8 block linears on `device` (a torch.device) until the block ends (this
    thread / task only)."""
    token = _FP8_MATMULS.set(device)
    try:
        yield
    finally:
        _FP8_MATMULS.reset(token)


def is_fp8_block_linear(module) -> bool:
    """Whether `module` is one of this pack's packed Linears holding fp8 (e4m3) weights with row scales, at a
    block linear's place (BLOCK_LINEAR): the layers fp8_matmul_enabled applies to."""
    return isinstance(module, quantized_operations().Linear) and module.fp8_matmul_block


def _same_device(a, b) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


@functools.lru_cache(maxsize=None)
def quantized_operations() -> type:
    """The host operations class (built once, on first use, so importing the pack stays light)."""
    import comfy.ops
    import torch
    import torch.nn.functional as F

    from ..flux_core.quant.linear import SPEC_KEY, decode_spec, dequantize_weight
    from ..flux_core.speed import fp8_linear  # looked up per call (tests count its scaled_mm calls)

    base = comfy.ops.manual_cast

    class FluxJuicedQuantizedOps(base):
        class Linear(base.Linear):
            def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
                # Built on meta: every weight arrives from the state dict, packed or dense, so the dense
                # 12B weights are never allocated.
                super().__init__(in_features, out_features, bias=bias, device="meta", dtype=dtype)
                self.compute_dtype = dtype
                self.storage, self.type_id = None, None
                self.register_buffer("qweight", None)
                self.register_buffer("scale", None)
                self.fp8_matmul_block = False  # packed fp8 at a block linear's place (set as it loads)
                self.packed_weight_patch = None  # the host's patches for the packed weight (packed_lora.py)

            def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs):
                spec = state_dict.get(prefix + SPEC_KEY)
                if spec is not None:
                    spec = decode_spec(spec)
                    self.storage, self.type_id = spec["storage"], spec["type_id"]
                    self.qweight = state_dict[prefix + "qweight"]
                    self.scale = state_dict.get(prefix + "scale")
                    self.weight = None
                    self.fp8_matmul_block = (self.storage == "fp8" and self.scale is not None
                                             and BLOCK_LINEAR.search(prefix) is not None)
                else:
                    self._take(state_dict, prefix + "weight", "weight", missing_keys)
                if self.bias is not None:
                    self._take(state_dict, prefix + "bias", "bias", missing_keys)

            def _save_to_state_dict(self, destination, prefix, keep_vars):
                super()._save_to_state_dict(destination, prefix, keep_vars)
                if self.qweight is not None:
                    # Empty, so the host's memory accounting still sees only the packed bytes; its presence
                    # lets the host's LoRA key mapping and add_patches target this layer.
                    destination[prefix + "weight"] = torch.empty(0, dtype=self.compute_dtype or torch.bfloat16)

            def _take(self, state_dict, key, leaf, missing_keys):
                tensor = state_dict.get(key)
                if tensor is None:
                    missing_keys.append(key)
                    return
                dtype = self.compute_dtype if tensor.is_floating_point() and self.compute_dtype else tensor.dtype
                setattr(self, leaf, torch.nn.Parameter(tensor.to(dtype), requires_grad=False))

            def forward(self, input, *args, **kwargs):
                if self.qweight is None:
                    return super().forward(input, *args, **kwargs)
                run_every_op = getattr(comfy.ops, "run_every_op", None)
                if run_every_op is not None:  # the host's interruption check
                    run_every_op()
                if self._fp8_matmul_allowed(input):
                    return self._fp8_matmul(input)
                device = input.device
                scale = self.scale.to(device) if self.scale is not None else None
                weight = dequantize_weight(self.storage, self.qweight.to(device), scale, self.type_id,
                                           (self.out_features, self.in_features), input.dtype)
                lora = self.packed_weight_patch
                if lora is not None and not lora.applied_by_host(self.weight_function):
                    weight = lora(weight)
                for patch in self.weight_function:  # the host's per-call weight patches (low-VRAM LoRA)
                    weight = patch(weight)
                bias = None
                if self.bias is not None:
                    bias = self.bias.to(device=device, dtype=input.dtype)
                    for patch in self.bias_function:
                        bias = patch(bias)
                return F.linear(input, weight, bias)

            def _fp8_matmul_allowed(self, input) -> bool:
                device = _FP8_MATMULS.get()
                return (device is not None and self.fp8_matmul_block and input.dtype == torch.bfloat16
                        and _same_device(input.device, device)
                        and self.packed_weight_patch is None  # patches need the dense weight
                        and not self.weight_function and not self.bias_function)

            def _fp8_matmul(self, input):
                """y = (x8 @ w8^T) * s_x * s_w + b in bf16: per-token e4m3 activations against the stored e4m3
                weight and its row scales, no dense weight made."""
                device = input.device
                xq, xs = fp8_linear.quantize_activations(input.reshape(-1, self.in_features))
                weight = self.qweight.to(device).view(fp8_linear.E4M3)
                bias = None if self.bias is None else self.bias.to(device=device, dtype=torch.bfloat16)
                out = fp8_linear.scaled_mm(xq, xs, weight, self.scale.to(device), bias, torch.bfloat16)
                return out.reshape(*input.shape[:-1], self.out_features)

    return FluxJuicedQuantizedOps
