"""Matmul precision: which arithmetic the transformer's linear layers use on this device.

Requests: "native" (the reference: the model's own dtype and kernels), "auto" (the fastest arithmetic that
only differs from native by rounding) and "fp8" (fp8 where the GPU has it, else "auto"). Choices:

* ``native``: the model's own dtype, as loaded.
* ``fp32-compute``: bf16/fp16 weights stay in memory as they are, but each large matmul runs in float32
  (inputs widened exactly, product rounded back to the model dtype). For CPUs without bf16/fp16 matrix
  instructions (no AVX512-BF16 / AMX / AVX-NE-CONVERT), where oneDNN emulates them: measured on an AVX2
  EPYC, a 1536x1536 @ 1536x6144 bf16 matmul took 1.38 s against 0.19 s widened (bench/README.md). Single
  rows (the modulation vectors) stay native: there widening the weight costs more than it saves.
* ``fp8``: float8 e4m3 weights and activations with per-row scales (fp8_linear.py), on GPUs of compute
  capability 8.9 and up.

Layers are switched by changing their class in place (an nn.Linear subclass), so parameter names, the
state dict and every hook stay as they were.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fp8_linear

PRECISIONS = ("native", "fp32-compute", "fp8")  # what can be chosen
REQUESTS = ("native", "auto", "fp8")
MIN_ROWS_TO_WIDEN = 16  # below this many rows the widened copy of the weight costs more than the matmul saves


@dataclass(frozen=True)
class PrecisionChoice:
    name: str    # one of PRECISIONS
    reason: str


def cpu_has_half_matmul(dtype: torch.dtype) -> bool:
    """Whether oneDNN has native bf16 / fp16 matmul instructions on this CPU."""
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError, TypeError):
        return False


def choose_precision(device, dtype: torch.dtype, requested: str = "auto") -> PrecisionChoice:
    """The arithmetic for `requested` (one of REQUESTS) on this device and dtype, with the reason."""
    if requested not in REQUESTS:
        raise ValueError(f"precision must be one of {', '.join(REQUESTS)}; got {requested!r}")
    device = torch.device(device)
    name = str(dtype).replace("torch.", "")
    if requested == "fp8":
        why_not = fp8_linear.fp8_unsupported(device, dtype)
        if why_not is None:
            return PrecisionChoice("fp8", "fp8 e4m3 matmuls with per-row weight and per-token activation scales "
                                          "(torch._scaled_mm) in the transformer blocks")
        fallback = choose_precision(device, dtype, "auto")
        return PrecisionChoice(fallback.name, f"{fallback.reason}; not fp8: {why_not}")
    if requested == "native":
        return PrecisionChoice("native", f"{name} matmuls (the model's dtype, the reference arithmetic)")
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not cpu_has_half_matmul(dtype):
        return PrecisionChoice("fp32-compute", f"{name} weights, matmuls computed in float32: this CPU has no native "
                                               f"{name} matrix instructions (oneDNN would emulate them, ~7x slower)")
    return PrecisionChoice("native", f"{name} matmuls (the model's dtype)")


class Fp32ComputeLinear(nn.Linear):
    """nn.Linear whose matmul runs in float32 on half-precision weights (see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 or x.numel() < MIN_ROWS_TO_WIDEN * x.shape[-1]:
            return super().forward(x)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)


def set_fp32_compute(model: nn.Module, on: bool = True) -> int:
    """Switch every plain nn.Linear of `model` to float32 compute (or back); returns how many changed."""
    source, target = (nn.Linear, Fp32ComputeLinear) if on else (Fp32ComputeLinear, nn.Linear)
    changed = 0
    for module in model.modules():
        if type(module) is source:
            module.__class__ = target
            changed += 1
    return changed
