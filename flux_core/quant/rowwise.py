"""Per-output-row weight quantization to int8 or fp8 (e4m3), with one float32 scale per row.

Public and small on purpose: the storage path (quant.linear) keeps (q, scale) and dequantizes per layer;
fp8 matmul code can reuse quantize_rows to get e4m3 weights with the row scales it feeds to scaled matmuls.
A row's scale maps its largest magnitude onto the format's largest value, so nothing clips and every row
uses the full range whatever the spread between rows.
"""
from __future__ import annotations

import torch
from torch import Tensor

FORMATS = ("int8", "fp8")
INT8_MAX = 127.0
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
CHUNK_ELEMENTS = 1 << 20  # quantizing at load time: float32 temporaries of a few MB
# Dequantizing in forward, elements per step by device type. A CPU runs mixed-dtype ops through full-size
# temporaries of the common dtype, so small steps bound them; a GPU casts on the fly and prefers few, large
# kernel launches per layer.
WORK_CHUNK = {"cpu": 1 << 20, "default": 1 << 24}


def work_chunk(device) -> int:
    return WORK_CHUNK.get(torch.device(device).type, WORK_CHUNK["default"])


def empty_rows(shape, fmt: str, device=None) -> tuple[Tensor, Tensor]:
    """Uninitialised (q, scale) buffers for quantize_rows(..., out=...)."""
    if fmt not in FORMATS:
        raise ValueError(f"row quantization format must be one of {FORMATS}; got {fmt!r}")
    q = torch.empty(tuple(shape), dtype=torch.int8 if fmt == "int8" else FP8_DTYPE, device=device)
    return q, torch.empty(shape[0], 1, dtype=torch.float32, device=device)


def quantize_rows(weight: Tensor, fmt: str, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(out, in) weight -> (q, scale) with q int8 or float8_e4m3fn (out, in) and scale float32 (out, 1),
    so that weight ~= q.float() * scale. `out` takes buffers from empty_rows: a loader allocates its
    long-lived results before reading the transient source weight, which keeps the heap from fragmenting."""
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight; got shape {list(weight.shape)}")
    q, scale = out if out is not None else empty_rows(weight.shape, fmt, weight.device)
    top = INT8_MAX if fmt == "int8" else FP8_MAX
    # Row chunks keep the float32 temporaries small next to a 12B model's largest (21504 x 3072) weight.
    step = max(1, CHUNK_ELEMENTS // max(weight.shape[1], 1))
    for start in range(0, weight.shape[0], step):
        w = weight[start:start + step].to(torch.float32, copy=True)  # divided in place below
        # An all-zero row gets scale 1 (any scale reproduces it); tiny rows keep their relative precision.
        amax = w.abs().amax(dim=1, keepdim=True)
        s = torch.where(amax > 0, amax / top, torch.ones_like(amax))
        scaled = w.div_(s)
        if fmt == "int8":
            q[start:start + step] = scaled.round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        else:
            q[start:start + step] = scaled.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        scale[start:start + step] = s
    return q, scale


def dequantize_rows(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The inverse of quantize_rows, in `dtype`: computed in float32 (the scale's dtype) and rounded once,
    in row steps so no full-size float32 temporary exists."""
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    step = max(1, work_chunk(q.device) // max(q.shape[1], 1))
    for start in range(0, q.shape[0], step):
        part, target = q[start:start + step], out[start:start + step]
        if part.dtype == FP8_DTYPE:  # no mixed-dtype math with fp8; e4m3 values are exact in any float dtype
            part = target.copy_(part)
        torch.mul(part, scale[start:start + step].float(), out=target)
    return out
