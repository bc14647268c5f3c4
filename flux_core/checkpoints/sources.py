"""Lazy tensor sources: a target parameter's shape known up front, its data read only when loaded.

A key map (checkpoint layout -> reference names) is a dict of these. Fused or reordered tensors from
other layouts (diffusers' split q/k/v, swapped shift/scale) are composed from plain sources, and fp8
weights are dequantized with their scale as they are read.
"""
from __future__ import annotations

import json

import torch

from .reader import TensorFile

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Per-layer scale spellings: ComfyUI's legacy scaled fp8 and its newer mixed-precision format.
WEIGHT_SCALE_SUFFIXES = ("scale_weight", "weight_scale")
# Keys that carry quantization bookkeeping, not weights.
QUANT_AUX_SUFFIXES = ("scale_weight", "weight_scale", "scale_input", "input_scale", "comfy_quant")


class Source:
    shape: torch.Size

    def load(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:  # storage dtype, for reporting
        raise NotImplementedError


class FileTensor(Source):
    """One tensor of a file; fp8 weights are scaled back by their per-layer scale when present."""

    def __init__(self, tf: TensorFile, key: str):
        self.tf, self.key = tf, key
        self.shape = tf.shape(key)

    @property
    def dtype(self):
        return self.tf.dtype(self.key)

    def scale_key(self):
        if self.dtype not in FP8_DTYPES or not self.key.endswith(".weight"):
            return None
        stem = self.key[: -len("weight")]
        for suffix in WEIGHT_SCALE_SUFFIXES:
            if stem + suffix in self.tf:
                return stem + suffix
        return None

    def load(self) -> torch.Tensor:
        t = self.tf.read(self.key)
        if t.dtype in FP8_DTYPES:
            t = t.to(torch.float32)
            scale_key = self.scale_key()
            if scale_key is not None:
                t.mul_(self.tf.read(scale_key).to(torch.float32))
        return t


class Concat(Source):
    def __init__(self, parts: list[Source], dim: int = 0):
        self.parts, self.dim = parts, dim
        shape = list(parts[0].shape)
        shape[dim] = sum(p.shape[dim] for p in parts)
        self.shape = torch.Size(shape)

    @property
    def dtype(self):
        return self.parts[0].dtype

    def load(self):
        loaded = [p.load() for p in self.parts]
        common = torch.promote_types(loaded[0].dtype, loaded[-1].dtype)
        return torch.cat([t.to(common) for t in loaded], dim=self.dim)


class SwapHalves(Source):
    """Swap the two halves along dim 0: diffusers' final norm is (scale, shift), the reference's (shift, scale)."""

    def __init__(self, inner: Source):
        self.inner, self.shape = inner, inner.shape

    @property
    def dtype(self):
        return self.inner.dtype

    def load(self):
        a, b = self.inner.load().chunk(2, dim=0)
        return torch.cat([b, a], dim=0)


class Reshaped(Source):
    """The same data in another shape (diffusers' 1x1 conv attention stored as Linear, and back)."""

    def __init__(self, inner: Source, shape):
        self.inner, self.shape = inner, torch.Size(shape)

    @property
    def dtype(self):
        return self.inner.dtype

    def load(self):
        return self.inner.load().reshape(self.shape)


def quantization_layers(tf: TensorFile) -> dict:
    """The `_quantization_metadata` header of ComfyUI's mixed-precision files, as a dict (or empty)."""
    raw = tf.metadata.get("_quantization_metadata")
    if not raw:
        return {}
    try:
        return json.loads(raw).get("layers", {}) or {}
    except (ValueError, AttributeError):
        return {}


def is_quant_aux(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return last in QUANT_AUX_SUFFIXES or last == "scaled_fp8"
