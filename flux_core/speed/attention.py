"""Attention backends for the FLUX blocks: which kernel computes softmax(q k^T / sqrt(d)) v.

Every backend takes q, k, v as (B, H, L, D) and returns (B, H, L, D), so a block can take any of them
(`DoubleStreamBlock.attn_backend`). `choose_attention` picks one for a device and dtype and says why:

* ``sdpa``: torch.nn.functional.scaled_dot_product_attention, the default everywhere. PyTorch itself picks the
  kernel per call: flash / cuDNN / memory-efficient on CUDA, its flash kernel on a CPU, a math fallback
  elsewhere. Exact up to kernel rounding.
* ``sage``: SageAttention (int8 q k^T, fp8/fp16 p v), only when the `sageattention` package imports and the
  GPU is one it has kernels for (compute capability 8.0 and up), fp16/bf16 only. Lossy by design, so only the
  fastest mode asks for it.
* ``math``: the formula in float32, written out. The reference the others are tested against; never chosen
  for speed.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..model import sdpa

BACKENDS = ("sdpa", "sage", "math")
SAGE_MIN_CAPABILITY = (8, 0)  # SageAttention 2 ships kernels for sm80, sm86, sm89, sm90 and sm120


def math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def _sage_module():
    """The sageattention module, or None when it is not installed or fails to import."""
    try:
        return importlib.import_module("sageattention")
    except Exception:  # an installed but broken wheel (wrong CUDA / torch) fails in many ways
        return None


def _sage(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return _sage_module().sageattn(q, k, v, tensor_layout="HND", is_causal=False)


_FUNCTIONS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {"sdpa": sdpa, "sage": _sage,
                                                                    "math": math_attention}


@dataclass(frozen=True)
class AttentionChoice:
    name: str        # one of BACKENDS
    reason: str      # why, in words (logged and stored in GenerationResult.settings)

    @property
    def fn(self) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        return _FUNCTIONS[self.name]


def sage_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why SageAttention cannot run here, or None when it can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"SageAttention needs a CUDA GPU (this is {device.type})"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"SageAttention takes fp16/bf16, the model is {str(dtype).replace('torch.', '')}"
    capability = torch.cuda.get_device_capability(device)
    if capability < SAGE_MIN_CAPABILITY:
        return f"SageAttention needs compute capability 8.0+, this GPU is {capability[0]}.{capability[1]}"
    if _sage_module() is None:
        return "the sageattention package is not installed (pip install sageattention)"
    return None


def _sdpa_reason(device: torch.device) -> str:
    if device.type == "cuda":
        kinds = [name for name, on in (("flash", torch.backends.cuda.flash_sdp_enabled()),
                                       ("cuDNN", torch.backends.cuda.cudnn_sdp_enabled()),
                                       ("memory-efficient", torch.backends.cuda.mem_efficient_sdp_enabled()))
                 if on]
        return f"PyTorch SDPA; it dispatches per call among the enabled CUDA kernels: {', '.join(kinds) or 'math'}"
    if device.type == "cpu":
        return "PyTorch SDPA (its flash-attention CPU kernel)"
    return f"PyTorch SDPA on {device.type}"


def choose_attention(device, dtype: torch.dtype, requested: str = "auto") -> AttentionChoice:
    """The backend for `requested` ("auto", "sdpa", "sage" or "math") on this device and dtype.

    "auto" and "sdpa" give SDPA. "sage" gives SageAttention where it can run, else SDPA with the reason."""
    if requested not in ("auto",) + BACKENDS:
        raise ValueError(f"attention must be one of auto, {', '.join(BACKENDS)}; got {requested!r}")
    device = torch.device(device)
    if requested == "math":
        return AttentionChoice("math", "the float32 reference, as requested (slow)")
    if requested == "sage":
        why_not = sage_unavailable(device, dtype)
        if why_not is None:
            return AttentionChoice("sage", "SageAttention (8-bit q k^T), as the mode asks; installed and supported")
        return AttentionChoice("sdpa", f"{_sdpa_reason(device)}; not SageAttention: {why_not}")
    return AttentionChoice("sdpa", _sdpa_reason(device))


def set_attention(model, choice: AttentionChoice) -> None:
    """Make every block of a flux_core Flux use this backend (the default class attribute is sdpa)."""
    for block in list(model.double_blocks) + list(model.single_blocks):
        if choice.name == "sdpa":
            block.__dict__.pop("attn_backend", None)  # back to the class default: the unmodified path
        else:
            block.attn_backend = choice.fn


__all__ = ["AttentionChoice", "BACKENDS", "choose_attention", "math_attention", "sage_unavailable", "set_attention",
           "sdpa"]
