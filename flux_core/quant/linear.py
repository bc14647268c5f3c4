"""A Linear layer whose weight stays quantized in memory and is dequantized inside forward.

Storage kinds:
  gguf  raw GGML blocks (uint8, rows x bytes) plus the GGML type id, dequantized by gguf_blocks
  int8  int8 weight plus a float32 scale per output row
  fp8   float8 e4m3 weight (kept as its uint8 bytes, so a module-wide .to(dtype) cannot upcast it) plus a
        float32 scale per output row
Only one layer's full-precision weight exists at a time: it is made in forward, used once and dropped.
The bias stays dense.
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gguf_blocks import GGML_TYPES, dequantize
from .rowwise import FP8_DTYPE, dequantize_rows, quantize_rows

STORAGES = ("gguf", "int8", "fp8")
# State-dict key (next to qweight/scale/bias) describing a packed layer, for hosts that rebuild the model.
SPEC_KEY = "quant_spec"


def encode_spec(spec: dict) -> Tensor:
    """A packed layer's description as a uint8 tensor, so it travels in a state dict like the weights."""
    return torch.tensor(list(json.dumps(spec, sort_keys=True).encode()), dtype=torch.uint8)


def decode_spec(tensor: Tensor) -> dict:
    spec = json.loads(bytes(tensor.tolist()).decode())
    if spec.get("storage") not in STORAGES:
        raise ValueError(f"unknown packed-layer description {spec}")
    return spec


def dequantize_weight(storage: str, qweight: Tensor, scale: Tensor | None, type_id: int | None, shape,
                      dtype: torch.dtype) -> Tensor:
    """The dense (out, in) weight of packed storage, in `dtype`, on qweight's device."""
    if storage == "gguf":
        return dequantize(qweight, type_id, shape, dtype)
    if storage == "int8":
        return dequantize_rows(qweight, scale, dtype)
    if storage == "fp8":
        return dequantize_rows(qweight.view(FP8_DTYPE), scale, dtype)
    raise ValueError(f"storage must be one of {STORAGES}; got {storage!r}")


def pack_weight(weight: Tensor, storage: str, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(qweight, scale) buffers for a dense weight in int8 or fp8 storage (into `out` from empty_rows)."""
    q, scale = quantize_rows(weight, storage, out=out)
    return (q.view(torch.uint8) if storage == "fp8" else q), scale


class QuantLinear(nn.Module):
    """y = x W^T + b with W kept packed; W is rebuilt in x's dtype on x's device at every call."""

    def __init__(self, in_features: int, out_features: int, storage: str, qweight: Tensor,
                 scale: Tensor | None = None, type_id: int | None = None, bias: Tensor | None = None):
        super().__init__()
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}; got {storage!r}")
        self.in_features, self.out_features = in_features, out_features
        self.storage, self.type_id = storage, type_id
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None, storage: str,
                   out: tuple[Tensor, Tensor] | None = None) -> "QuantLinear":
        qweight, scale = pack_weight(weight, storage, out=out)
        return cls(weight.shape[1], weight.shape[0], storage, qweight, scale, bias=bias)

    @classmethod
    def from_gguf(cls, blocks: Tensor, type_id: int, shape, bias: Tensor | None) -> "QuantLinear":
        out_features, in_features = shape
        return cls(in_features, out_features, "gguf", blocks, type_id=type_id, bias=bias)

    def dequantized_weight(self, dtype: torch.dtype, device=None) -> Tensor:
        qweight, scale = self.qweight, self.scale
        if device is not None and qweight.device != torch.device(device):  # weights parked elsewhere
            qweight = qweight.to(device, non_blocking=True)
            scale = scale.to(device, non_blocking=True) if scale is not None else None
        return dequantize_weight(self.storage, qweight, scale, self.type_id,
                                 (self.out_features, self.in_features), dtype)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.dequantized_weight(x.dtype, x.device)
        bias = self.bias.to(device=x.device, dtype=x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)

    def spec(self) -> dict:
        return {"storage": self.storage, "type_id": self.type_id, "shape": [self.out_features, self.in_features]}

    def packed_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale) if t is not None)

    @property
    def kind(self) -> str:
        """The storage as people name it: the GGML type (Q4_K, ...) or int8 / fp8."""
        return GGML_TYPES[self.type_id].name if self.storage == "gguf" else self.storage

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, storage={self.kind}, " \
               f"bias={self.bias is not None}"
