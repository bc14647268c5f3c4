"""GGML tensor types and their dequantization, written as plain vectorised torch ops.

Each block type turns a (blocks, bytes_per_block) uint8 tensor into integers, scales and offsets, which one
float pass combines into (blocks, elements_per_block) values. The ops are integer shifts, masks and float
multiplies only, so they run on any device the packed bytes live on (CPU, CUDA, MPS). Block math is float32
whatever the target dtype, rounded once to it.

Layouts (all little-endian; d/dmin/m are fp16):
  Q8_0  32 in 34 B: d, 32 x int8                         w = d*q
  Q4_0  32 in 18 B: d, 16 B nibbles                      w = d*(q-8)
  Q4_1  32 in 20 B: d, m, 16 B nibbles                   w = d*q + m
  Q5_0  32 in 22 B: d, 4 B high bits, 16 B nibbles       w = d*(q-16)
  Q5_1  32 in 24 B: d, m, 4 B high bits, 16 B nibbles    w = d*q + m
  Q2_K 256 in 84 B: 16 B scale|min nibbles, 64 B 2-bit q, d, dmin
  Q3_K 256 in 110 B: 32 B high-bit mask, 64 B 2-bit q, 12 B 6-bit scales, d
  Q4_K 256 in 144 B: d, dmin, 12 B 6-bit scale/min pairs, 128 B nibbles
  Q5_K 256 in 176 B: d, dmin, 12 B scale/min pairs, 32 B high bits, 128 B nibbles
  Q6_K 256 in 210 B: 128 B low nibbles, 64 B 2-bit highs, 16 x int8 scales, d
"Nibbles" hold element j of a 32-group in the low half of byte j (j < 16) and element j in the high half
of byte j-16 (j >= 16).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from .rowwise import work_chunk


@dataclass(frozen=True)
class GGMLType:
    id: int
    name: str
    block_size: int  # elements per block
    type_size: int   # bytes per block
    supported: bool = True

    def nbytes(self, n_elements: int) -> int:
        return n_elements // self.block_size * self.type_size

    @property
    def quantized(self) -> bool:
        return self.block_size > 1


# Plain (unblocked) types read as ordinary tensors.
PLAIN_DTYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16, 28: torch.float64,
                24: torch.int8, 25: torch.int16, 26: torch.int32, 27: torch.int64}

_TYPES = [
    GGMLType(0, "F32", 1, 4), GGMLType(1, "F16", 1, 2), GGMLType(30, "BF16", 1, 2), GGMLType(28, "F64", 1, 8),
    GGMLType(24, "I8", 1, 1), GGMLType(25, "I16", 1, 2), GGMLType(26, "I32", 1, 4), GGMLType(27, "I64", 1, 8),
    GGMLType(2, "Q4_0", 32, 18), GGMLType(3, "Q4_1", 32, 20), GGMLType(6, "Q5_0", 32, 22),
    GGMLType(7, "Q5_1", 32, 24), GGMLType(8, "Q8_0", 32, 34),
    GGMLType(10, "Q2_K", 256, 84), GGMLType(11, "Q3_K", 256, 110), GGMLType(12, "Q4_K", 256, 144),
    GGMLType(13, "Q5_K", 256, 176), GGMLType(14, "Q6_K", 256, 210),
    # Known to the format, not handled here: sizes are listed so a file holding them is still parsed and
    # refused by name rather than as corrupt.
    GGMLType(9, "Q8_1", 32, 40, False), GGMLType(15, "Q8_K", 256, 292, False),
    GGMLType(16, "IQ2_XXS", 256, 66, False), GGMLType(17, "IQ2_XS", 256, 74, False),
    GGMLType(18, "IQ3_XXS", 256, 98, False), GGMLType(19, "IQ1_S", 256, 50, False),
    GGMLType(20, "IQ4_NL", 32, 18, False), GGMLType(21, "IQ3_S", 256, 110, False),
    GGMLType(22, "IQ2_S", 256, 82, False), GGMLType(23, "IQ4_XS", 256, 136, False),
    GGMLType(29, "IQ1_M", 256, 56, False), GGMLType(34, "TQ1_0", 256, 54, False),
    GGMLType(35, "TQ2_0", 256, 66, False), GGMLType(39, "MXFP4", 32, 17, False),
]
GGML_TYPES: dict[int, GGMLType] = {t.id: t for t in _TYPES}
SUPPORTED_QUANTIZED = tuple(t.name for t in _TYPES if t.supported and t.quantized)


# ------------------------------------------------------------------------------------------------
# helpers on (n, bytes) uint8 blocks


def _f16(blocks: Tensor, at: int) -> Tensor:
    """The fp16 field at byte `at` of every block, as (n, 1) float32."""
    return blocks[:, at:at + 2].view(torch.float16).float()  # offsets and block sizes are even


def _nibbles(qs: Tensor) -> Tensor:
    """(n, 16k) bytes -> (n, 32k) 4-bit values: per 16-byte group the low halves, then the high halves."""
    n, width = qs.shape
    groups = qs.reshape(n, width // 16, 1, 16)
    return torch.cat([groups & 0x0F, groups >> 4], dim=2).reshape(n, width * 2)


def _bits(x: Tensor) -> Tensor:
    """(n, k) bytes -> (n, k, 8) bits, least significant first."""
    shifts = torch.arange(8, dtype=torch.uint8, device=x.device)
    return (x.unsqueeze(-1) >> shifts) & 1


def _crumbs(x: Tensor) -> Tensor:
    """(n, ..., k) bytes -> (n, ..., 4, k) 2-bit fields, least significant first (shift 0, 2, 4, 6)."""
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=x.device).reshape(4, 1)
    return (x.unsqueeze(-2) >> shifts) & 3


# ------------------------------------------------------------------------------------------------
# Each kernel returns (q, scale, offset) with w = q * scale + offset: q an integer tensor (n, groups, size),
# scale and offset float32 (n, groups, 1), offset None when the type has no minimum. The integers stay
# small (int8/uint8) until the single float pass that combines them, the costly part on a CPU.

Parts = tuple[Tensor, Tensor, "Tensor | None"]


def _per_block(x: Tensor) -> Tensor:
    return x.reshape(-1, 1, 1)


def _q8_0(b: Tensor) -> Parts:
    return b[:, 2:34].view(torch.int8).reshape(-1, 1, 32), _per_block(_f16(b, 0)), None


def _q4_0(b: Tensor) -> Parts:
    q = _nibbles(b[:, 2:18]).view(torch.int8) - 8
    return q.reshape(-1, 1, 32), _per_block(_f16(b, 0)), None


def _q4_1(b: Tensor) -> Parts:
    return _nibbles(b[:, 4:20]).reshape(-1, 1, 32), _per_block(_f16(b, 0)), _per_block(_f16(b, 2))


def _five_bit(qh: Tensor, qs: Tensor) -> Tensor:
    """4 bytes of high bits (bit j for element j) over 16 bytes of nibbles -> 32 values in 0..31."""
    return _nibbles(qs) | (_bits(qh).reshape(qh.shape[0], 32) << 4)


def _q5_0(b: Tensor) -> Parts:
    q = _five_bit(b[:, 2:6], b[:, 6:22]).view(torch.int8) - 16
    return q.reshape(-1, 1, 32), _per_block(_f16(b, 0)), None


def _q5_1(b: Tensor) -> Parts:
    return _five_bit(b[:, 4:8], b[:, 8:24]).reshape(-1, 1, 32), _per_block(_f16(b, 0)), _per_block(_f16(b, 2))


# ------------------------------------------------------------------------------------------------
# 256-element super-blocks. In every K type element e belongs to sub-block e // 16 (Q2/Q3/Q6) or
# e // 32 (Q4/Q5), and the bit fields below are arranged so that a plain reshape gives element order.


def _two_bit_planes(qs: Tensor) -> Tensor:
    """64 bytes of 2-bit values -> 256 in element order: half h, shift j, byte l -> element 128h + 32j + l."""
    return _crumbs(qs.reshape(-1, 2, 32)).reshape(-1, 256)


def _q2_k(b: Tensor) -> Parts:
    scales = b[:, 0:16]
    d, dmin = _f16(b, 80), _f16(b, 82)
    scale = (d * (scales & 0x0F).float()).unsqueeze(-1)
    offset = (dmin * (scales >> 4).float()).neg_().unsqueeze(-1)
    return _two_bit_planes(b[:, 16:80]).reshape(-1, 16, 16), scale, offset


def _q3_k_scales(s: Tensor) -> Tensor:
    """12 bytes -> 16 signed 6-bit scales: low 4 bits from the nibbles of bytes 0-7 (all low halves first),
    high 2 bits of scale 4a+b from bits 2a..2a+1 of byte 8+b."""
    low = torch.cat([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], dim=1)
    high = _crumbs(s[:, 8:12]).reshape(-1, 16)
    return (low | (high << 4)).float() - 32


def _q3_k(b: Tensor) -> Parts:
    # Mask bit 4h+j of byte l belongs to element 128h + 32j + l; a clear bit means "minus 4", so the value
    # is (2-bit q | mask bit << 2) - 4.
    high = _bits(b[:, 0:32]).transpose(1, 2).reshape(-1, 256)
    q = (_two_bit_planes(b[:, 32:96]) | (high << 2)).view(torch.int8) - 4
    scale = (_f16(b, 108) * _q3_k_scales(b[:, 96:108])).unsqueeze(-1)
    return q.reshape(-1, 16, 16), scale, None


def _k_scales_mins(s: Tensor) -> tuple[Tensor, Tensor]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins (Q4_K, Q5_K).

    Sub-blocks 0-3 use the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7 take their
    low 4 bits from the nibbles of bytes 8-11 and their top 2 bits from the spare top bits of bytes 0-7."""
    scales = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], dim=1)
    mins = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return scales.float(), mins.float()


def _k_nibbles(qs: Tensor) -> Tensor:
    """128 bytes -> 256 values: per 32-byte chunk c, low nibbles are sub-block 2c, high nibbles 2c+1."""
    chunks = qs.reshape(-1, 4, 1, 32)
    return torch.cat([chunks & 0x0F, chunks >> 4], dim=2).reshape(-1, 8, 32)


def _k_scale_offset(b: Tensor) -> tuple[Tensor, Tensor]:
    """Per sub-block of 32: scale d*sc and offset -dmin*m (Q4_K, Q5_K)."""
    scales, mins = _k_scales_mins(b[:, 4:16])
    return (_f16(b, 0) * scales).unsqueeze(-1), (_f16(b, 2) * mins).neg_().unsqueeze(-1)


def _q4_k(b: Tensor) -> Parts:
    return (_k_nibbles(b[:, 16:144]), *_k_scale_offset(b))


def _q5_k(b: Tensor) -> Parts:
    # Bit i of high-bit byte l belongs to element l of sub-block i.
    high = _bits(b[:, 16:48]).transpose(1, 2)
    return (_k_nibbles(b[:, 48:176]) | (high << 4), *_k_scale_offset(b))


def _q6_k(b: Tensor) -> Parts:
    # Per half h: element 128h + 32k + l takes nibble k//2 of low byte (l + 32*(k%2)) and bits 2k..2k+1
    # of high byte l.
    ql = b[:, 0:128].reshape(-1, 2, 1, 2, 32)
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(-1, 2, 4, 32)
    high = _crumbs(b[:, 128:192].reshape(-1, 2, 32))
    q = (low | (high << 4)).view(torch.int8) - 32
    scales = b[:, 192:208].view(torch.int8).float()
    return q.reshape(-1, 16, 16), (_f16(b, 208) * scales).unsqueeze(-1), None


_DEQUANT: dict[int, Callable[[Tensor], Parts]] = {
    8: _q8_0, 2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1,
    10: _q2_k, 11: _q3_k, 12: _q4_k, 13: _q5_k, 14: _q6_k,
}



def dequantize(raw: Tensor, type_id: int, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """GGML data (uint8, any shape, contiguous bytes in file order) -> a `shape` tensor of `dtype` on the
    same device."""
    kind = GGML_TYPES.get(type_id)
    if kind is None or not kind.supported:
        name = kind.name if kind else f"type id {type_id}"
        raise ValueError(f"GGML type {name} is not supported (supported: F32, F16, BF16, "
                         f"{', '.join(SUPPORTED_QUANTIZED)})")
    n = math.prod(shape)
    flat = raw.reshape(-1)
    if flat.dtype != torch.uint8 or flat.numel() != kind.nbytes(n) or n % kind.block_size:
        raise ValueError(f"{kind.name} data of {flat.numel()} bytes ({flat.dtype}) does not hold shape "
                         f"{list(shape)}")
    if not kind.quantized:
        return flat.view(PLAIN_DTYPES[type_id]).reshape(tuple(shape)).to(dtype)
    blocks = flat.reshape(-1, kind.type_size)
    out = torch.empty(blocks.shape[0], kind.block_size, dtype=dtype, device=raw.device)
    step = max(1, work_chunk(raw.device) // kind.block_size)  # bounds the float temporaries per step
    parts = _DEQUANT[type_id]
    for start in range(0, blocks.shape[0], step):
        q, scale, offset = parts(blocks[start:start + step])
        target = out[start:start + step].view(q.shape)
        # The reference's float32 math, rounded once to the target dtype. A product alone is computed in
        # float32 and stored in the target directly (mixed-dtype mul); with an offset, a float32 buffer
        # holds the sum unless the target is float32 itself.
        if offset is None:
            torch.mul(q, scale, out=target)
        elif dtype == torch.float32:
            torch.mul(q, scale, out=target).add_(offset)
        else:
            target.copy_(torch.mul(q, scale).add_(offset))
    return out.reshape(tuple(shape))
