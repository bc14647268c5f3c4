"""Reading GGUF files lazily: header, metadata and tensor table parsed and validated up front, each
tensor's bytes read on demand with readinto (no memory map stays resident, no whole-file read).

GGUFFile offers the same surface as reader.TensorFile (keys, shape, dtype, read), so the transformer key
maps apply unchanged: read() gives a dequantized float32 tensor. read_packed() gives the raw GGML blocks
for layers that stay quantized in memory.

Format facts used (GGUF v2/v3, little-endian): magic "GGUF", uint32 version, uint64 tensor count,
uint64 metadata count; metadata as (string key, uint32 value type, value); tensor infos as (string name,
uint32 n_dims, uint64 dims innermost first, uint32 GGML type, uint64 offset from the data start); the data
starts at the next multiple of `general.alignment` (default 32). Strings are a uint64 length plus UTF-8.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..quant.gguf_blocks import GGML_TYPES, PLAIN_DTYPES, SUPPORTED_QUANTIZED, GGMLType, dequantize
from .reader import ByteRangeFile, TensorTable

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
# ComfyUI-GGUF's optional per-tensor logical shape, for tensors stored in another shape.
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."

# value type id -> struct format (scalars); 8 = string, 9 = array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    kind: GGMLType
    shape: torch.Size         # logical torch order (outermost first)
    stored_shape: torch.Size  # the dims as stored, reversed to torch order; blocks run along the last
    begin: int                # absolute file offset
    nbytes: int


@dataclass(frozen=True)
class PackedTensor:
    """Raw GGML blocks of one tensor: (rows, bytes per row) uint8 in torch row order."""

    data: torch.Tensor
    type_id: int
    shape: torch.Size

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.data, self.type_id, self.shape, dtype)


class _Cursor:
    """Sequential little-endian reads of the header with bounds checks against the file size."""

    def __init__(self, f, path: Path, size: int):
        self.f, self.path, self.size = f, path, size

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise CheckpointError(self.path, "the GGUF header is cut short", found=f"{self.size} bytes",
                                  hint="the download was probably cut off; download the file again")
        return data

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        if n > self.size:
            raise CheckpointError(self.path, "the GGUF header is corrupt", found=f"a string of {n} bytes")
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, type_id: int):
        if type_id in _SCALARS:
            return self.scalar(_SCALARS[type_id])
        if type_id == _STRING:
            return self.string()
        if type_id == _ARRAY:
            item_type, count = self.scalar("<I"), self.scalar("<Q")
            if count > self.size:
                raise CheckpointError(self.path, "the GGUF header is corrupt", found=f"an array of {count} items")
            if item_type in _SCALARS:  # one unpack for the whole array
                fmt = _SCALARS[item_type]
                width = struct.calcsize(fmt)
                return list(struct.unpack(f"<{count}{fmt[1]}", self.take(count * width)))
            return [self.value(item_type) for _ in range(count)]
        raise CheckpointError(self.path, "the GGUF header is corrupt", found=f"metadata value type {type_id}")


class GGUFFile(TensorTable):
    """The tensors of one .gguf file, with the TensorFile interface plus packed reads."""

    def __init__(self, path):
        self.path = Path(path)
        self.file = ByteRangeFile(self.path)
        self.metadata: dict = {}
        self.tensors: dict[str, GGUFTensorInfo] = {}
        self.version = 0
        self._parse()

    # -- parsing ---------------------------------------------------------------------------------

    def _parse(self):
        path, size = self.path, self.path.stat().st_size
        with open(path, "rb") as f:
            cur = _Cursor(f, path, size)
            magic = f.read(4)
            if magic != MAGIC:
                raise CheckpointError(path, "this is not a GGUF file", found=f"magic bytes {magic!r}",
                                      expected="a file starting with 'GGUF'")
            version = cur.scalar("<I")
            if version not in (2, 3):
                problem = ("big-endian GGUF files are not supported" if version > 0xFFFF
                           else f"GGUF version {version} is not supported")
                raise CheckpointError(path, problem, found=f"version field {version}", expected="GGUF version 2 or 3")
            self.version = version
            n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
            if n_tensors > size or n_kv > size:
                raise CheckpointError(path, "the GGUF header is corrupt",
                                      found=f"{n_tensors} tensors and {n_kv} metadata entries in {size} bytes")
            for _ in range(n_kv):
                key = cur.string()
                self.metadata[key] = cur.value(cur.scalar("<I"))
            raw_infos = [self._tensor_info(cur) for _ in range(n_tensors)]
            alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
            if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
                raise CheckpointError(path, "the GGUF header is corrupt", found=f"alignment {alignment!r}",
                                      expected="a power of two")
            data_start = -(-f.tell() // alignment) * alignment
        for name, kind, stored, offset in raw_infos:
            self.tensors[name] = self._place(name, kind, stored, data_start + offset, size)
        self._refuse_unsupported()

    def _tensor_info(self, cur: _Cursor):
        name = cur.string()
        n_dims = cur.scalar("<I")
        if not 0 < n_dims <= MAX_DIMS:
            raise CheckpointError(self.path, f"tensor '{name}' has a corrupt entry", found=f"{n_dims} dimensions",
                                  expected=f"1 to {MAX_DIMS}")
        dims = [cur.scalar("<Q") for _ in range(n_dims)]
        type_id, offset = cur.scalar("<I"), cur.scalar("<Q")
        kind = GGML_TYPES.get(type_id)
        if kind is None:
            raise CheckpointError(self.path, f"tensor '{name}' has an unknown GGML type", found=f"type id {type_id}",
                                  hint="the file may come from a newer GGUF tool than this loader knows")
        return name, kind, torch.Size(reversed(dims)), offset  # innermost first on disk -> torch order

    def _place(self, name, kind: GGMLType, stored: torch.Size, begin: int, size: int) -> GGUFTensorInfo:
        if stored[-1] % kind.block_size:
            raise CheckpointError(self.path, f"tensor '{name}' does not fit its block type",
                                  found=f"rows of {stored[-1]} elements in {kind.name}",
                                  expected=f"a multiple of {kind.block_size}")
        nbytes = kind.nbytes(math.prod(stored))
        if begin + nbytes > size:
            raise CheckpointError(self.path, "the file is truncated", found=f"{size} bytes on disk",
                                  expected=f"at least {begin + nbytes} bytes (tensor '{name}' ends there)",
                                  hint="download the file again")
        shape = stored
        override = self.metadata.get(ORIG_SHAPE_KEY + name)
        if isinstance(override, list) and override:
            if math.prod(override) != math.prod(stored):
                raise CheckpointError(self.path, f"tensor '{name}' has an inconsistent original shape",
                                      found=f"{override} for {list(stored)} stored")
            shape = torch.Size(int(d) for d in override)
        return GGUFTensorInfo(name, kind, shape, stored, begin, nbytes)

    def _refuse_unsupported(self):
        bad = [info for info in self.tensors.values() if not info.kind.supported]
        if bad:
            first = bad[0]
            more = ""
            if len(bad) > 1:
                more = f" (and {len(bad) - 1} more tensors of types {sorted({b.kind.name for b in bad})})"
            raise CheckpointError(self.path, f"tensor '{first.name}' uses GGML type {first.kind.name}, which this "
                                             f"loader does not dequantize{more}",
                                  expected=f"F32, F16, BF16 or {', '.join(SUPPORTED_QUANTIZED)}",
                                  hint="use a Q8_0, Q5/Q4 or K-quant GGUF of the same model")

    # -- TensorFile interface ---------------------------------------------------------------------

    def dtype(self, key) -> torch.dtype:
        """The stored dtype for plain tensors; uint8 (raw blocks) for quantized ones."""
        return PLAIN_DTYPES.get(self.tensors[key].kind.id, torch.uint8)

    def type_name(self, key) -> str:
        return self.tensors[key].kind.name

    def is_quantized(self, key) -> bool:
        return self.tensors[key].kind.quantized

    def read(self, key) -> torch.Tensor:
        """A plain tensor as stored, or a quantized one dequantized to float32."""
        info = self.tensors[key]
        raw = self._read_bytes(info)
        return dequantize(raw, info.kind.id, info.shape, PLAIN_DTYPES.get(info.kind.id, torch.float32))

    def read_packed(self, key) -> PackedTensor:
        """The raw blocks, shaped (rows, bytes per row) in the stored layout."""
        info = self.tensors[key]
        rows = math.prod(info.stored_shape[:-1])
        data = self._read_bytes(info).reshape(rows, info.nbytes // max(rows, 1))
        return PackedTensor(data, info.kind.id, info.stored_shape)

    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def _read_bytes(self, info: GGUFTensorInfo) -> torch.Tensor:
        return self.file.read(info.begin, info.nbytes, info.name)

    def close(self):
        self.file.close()


def open_gguf(path) -> GGUFFile:
    path = Path(os.fspath(path)).expanduser()
    if not path.is_file():
        raise CheckpointError(path, "the file does not exist",
                              hint="check the path, or see the README for which files to download and where")
    return GGUFFile(path)
