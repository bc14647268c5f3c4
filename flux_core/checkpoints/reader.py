"""Reading safetensors files lazily, one tensor at a time, with the whole header validated up front.

The header is parsed by hand so that a truncated or corrupt file is refused before a single weight is
read, and each tensor is read straight into its own buffer (no memory map stays resident), so loading
never holds a second copy of the weights.
"""
from __future__ import annotations

import json
import math
import os
import struct
import threading
from pathlib import Path

import torch

from ..errors import CheckpointError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class TensorInfo:
    __slots__ = ("key", "dtype", "shape", "begin", "end", "shard")

    def __init__(self, key, dtype, shape, begin, end, shard):
        self.key, self.dtype, self.shape = key, dtype, torch.Size(shape)
        self.begin, self.end, self.shard = begin, end, shard


class ByteRangeFile:
    """A file read by byte ranges into fresh tensors: opened on the first read, one reader at a time."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.handle = None

    def read(self, begin: int, nbytes: int, name: str) -> torch.Tensor:
        """nbytes from offset begin as a uint8 tensor; CheckpointError naming tensor `name` if the file ends."""
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if not nbytes:
            return buf
        view = memoryview(buf.numpy())
        with self.lock:
            if self.handle is None:
                self.handle = open(self.path, "rb")
            self.handle.seek(begin)
            done = 0
            while done < nbytes:
                n = self.handle.readinto(view[done:])
                if not n:
                    raise CheckpointError(self.path, "the file ended while reading",
                                          found=f"tensor '{name}' cut short", hint="download the file again")
                done += n
        return buf

    def close(self):
        if self.handle is not None:
            self.handle.close()
            self.handle = None


class _Shard:
    """One safetensors file: its validated header and the file for reads."""

    def __init__(self, path: Path):
        self.path = path
        self.file = ByteRangeFile(path)
        self.metadata: dict = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse()

    def _parse(self):
        path = self.path
        size = path.stat().st_size
        if size < 8:
            raise CheckpointError(path, "the file is too short to be a safetensors file",
                                  found=f"{size} bytes", expected="an 8-byte header length, a JSON header and data",
                                  hint="the download was probably cut off; download the file again")
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(path, "the safetensors header is corrupt",
                                      found=f"a header length of {header_len} bytes in a file of {size} bytes",
                                      expected="a header shorter than the file",
                                      hint="the file is truncated, corrupt or not a safetensors file")
            raw = f.read(header_len)
        try:
            header = json.loads(raw)
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(path, "the safetensors header is not valid JSON", found=str(exc)[:200],
                                  hint="the file is corrupt or not a safetensors file") from None
        data_start = 8 + header_len
        data_size = size - data_start
        self.metadata = header.pop("__metadata__", None) or {}
        for key, entry in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                shape = [int(d) for d in entry["shape"]]
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(path, f"the header entry of tensor '{key}' is malformed",
                                      found=json.dumps(entry)[:200],
                                      expected="dtype, shape and data_offsets of a known type") from None
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes or begin < 0:
                raise CheckpointError(path, f"tensor '{key}' has inconsistent offsets",
                                      found=f"{end - begin} bytes", expected=f"{nbytes} bytes for shape {shape}")
            if end > data_size:
                raise CheckpointError(path, "the file is truncated",
                                      found=f"{size} bytes on disk", expected=f"at least {data_start + end} bytes "
                                      f"(tensor '{key}' ends there)", hint="download the file again")
            self.tensors[key] = TensorInfo(key, dtype, shape, data_start + begin, data_start + end, self)

    def read(self, info: TensorInfo) -> torch.Tensor:
        buf = self.file.read(info.begin, info.end - info.begin, info.key)
        return buf.view(info.dtype).reshape(info.shape)

    def close(self):
        self.file.close()


class TensorTable:
    """What the loaders use of an open checkpoint: `tensors` (name -> info with a `shape`), plus dtype(),
    read() and close() from each format's class; a context manager that closes it."""

    tensors: dict

    def keys(self):
        return self.tensors.keys()

    def __contains__(self, key):
        return key in self.tensors

    def shape(self, key) -> torch.Size:
        return self.tensors[key].shape

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TensorFile(TensorTable):
    """The tensors of one checkpoint: a single safetensors file or a sharded set with an index."""

    def __init__(self, path, shards: list[_Shard]):
        self.path = Path(path)
        self.shards = shards
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict = {}
        for shard in shards:
            self.tensors.update(shard.tensors)
            self.metadata.update(shard.metadata)

    def dtype(self, key) -> torch.dtype:
        return self.tensors[key].dtype

    def read(self, key) -> torch.Tensor:
        info = self.tensors[key]
        return info.shard.read(info)

    def total_bytes(self) -> int:
        return sum(i.end - i.begin for i in self.tensors.values())

    def close(self):
        for shard in self.shards:
            shard.close()


def _refuse_unsupported(path: Path, gguf: bool):
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise CheckpointError(path, "pickle checkpoints are refused",
                              found=f"a '{suffix}' file, which can run arbitrary code when loaded",
                              expected="a .safetensors file (or .gguf for quantized transformers)",
                              hint="download the safetensors version of this model, or convert it once in a "
                                   "trusted environment")
    if suffix == ".gguf" and not gguf:
        raise CheckpointError(path, "GGUF files are supported for the FLUX transformer only",
                              expected="a .safetensors file for the text encoders and the autoencoder",
                              hint="use t5xxl_fp8_e4m3fn.safetensors to save memory on the T5 side")


def open_checkpoint(path, gguf: bool = False) -> TensorFile:
    """Open a safetensors file, or a folder holding one file or shards with an index.json.

    With gguf=True a .gguf file opens as a GGUFFile (same interface; used for transformers)."""
    path = Path(os.fspath(path)).expanduser()
    if not path.exists():
        raise CheckpointError(path, "the file does not exist",
                              hint="check the path, or see the README for which files to download and where")
    if path.is_dir():
        return _open_folder(path)
    _refuse_unsupported(path, gguf)
    if path.suffix.lower() == ".gguf":
        from .gguf import open_gguf

        return open_gguf(path)
    if path.suffix.lower() == ".json":
        return _open_index(path)
    return TensorFile(path, [_Shard(path)])


def _prefer_plain(paths: list[Path], suffix: str) -> list[Path]:
    """Drop diffusers' variant copies (name.fp16.safetensors) when a plain file sits beside them."""
    plain = [p for p in paths if "." not in p.name[: -len(suffix)]]
    return plain or paths


def _open_folder(folder: Path) -> TensorFile:
    indexes = _prefer_plain(sorted(folder.glob("*.safetensors.index.json")), ".safetensors.index.json")
    if len(indexes) == 1:
        return _open_index(indexes[0])
    files = _prefer_plain(sorted(folder.glob("*.safetensors")), ".safetensors")
    if len(files) == 1:
        return TensorFile(folder, [_Shard(files[0])])
    found = ", ".join(p.name for p in sorted(folder.iterdir())[:8]) or "an empty folder"
    raise CheckpointError(folder, "the folder holds no single checkpoint", found=found,
                          expected="one .safetensors file, or shards with one *.safetensors.index.json")


def _open_index(index_path: Path) -> TensorFile:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(index_path, "the shard index is malformed", found=str(exc)[:200],
                              expected="a JSON object with a 'weight_map'") from None
    shards = []
    for name in sorted(set(weight_map.values())):
        shard_path = index_path.parent / name
        if not shard_path.exists():
            raise CheckpointError(shard_path, "a shard named in the index is missing",
                                  expected=f"every shard listed in {index_path.name}")
        shards.append(_Shard(shard_path))
    tf = TensorFile(index_path.parent, shards)
    missing = [k for k in weight_map if k not in tf.tensors]
    if missing:
        raise CheckpointError(index_path, "the shards do not hold every tensor of the index",
                              found=f"{len(missing)} missing, e.g. '{missing[0]}'")
    return tf
