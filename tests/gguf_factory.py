"""GGUF test files written by the maintained `gguf` package (its GGUFWriter and gguf.quants), and the
package's own dequantization as the oracle. Nothing here asks flux_core how GGUF works.

Types the package can quantize (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, BF16) are made from real weights, so their
files approximate the weights. The K types (Q2_K..Q6_K) have no quantizer in the package: their blocks are
random bytes with finite fp16 scale fields, rescaled so the weights have the size the layer needs; the
oracle's dequantization of those bytes is then the truth the loader must reproduce.

FLUX files follow the convention of city96's FLUX GGUFs (formats.md 2(f)): BFL key names (optionally with
`model.diffusion_model.`), general.architecture "flux", 1-D tensors and tensors of at most 1024 elements in
F32, the input/output layers (img_in, txt_in, time_in, vector_in, guidance_in, final_layer) in the base
float type, every other weight quantized.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

import gguf
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
LISTED = QUANTIZABLE + K_TYPES
# Byte offsets of the fp16 scale fields (d, and dmin/m where present) inside one block (formats.md 2(f)).
K_FP16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
FP16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), **K_FP16_FIELDS}
DENSE_PREFIXES = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tests' matrices are small: on a shared 2-core machine one thread is several times faster than two
    threads waiting on each other. Imported by the test modules that use it; the setting is put back."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def qtype(name: str) -> T:
    return getattr(T, name)


def block_size(name: str) -> int:
    return gguf.GGML_QUANT_SIZES[qtype(name)][0]


def oracle_dequantize(data: np.ndarray, name: str) -> torch.Tensor:
    """The package's dequantization of GGUF data (uint8 blocks or a plain float array) as float32."""
    if data.dtype in (np.float32, np.float16):
        return torch.from_numpy(data.astype(np.float32))
    return torch.from_numpy(np.ascontiguousarray(quants.dequantize(data, qtype(name)), dtype=np.float32))


def random_k_blocks(rows: int, cols: int, name: str, rng: np.random.Generator, target_std: float | None = None
                    ) -> np.ndarray:
    """Random valid blocks of a listed type: random bytes, fp16 scale fields drawn finite (N(0,1)), then
    scaled so the dequantized values have std `target_std` (the format is linear in its fp16 fields)."""
    size, type_size = gguf.GGML_QUANT_SIZES[qtype(name)]
    n_blocks = rows * cols // size
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    fields = FP16_FIELDS[name]
    values = {at: rng.normal(0, 1, n_blocks).astype(np.float32) for at in fields}

    def write(factor: float):
        for at, v in values.items():
            raw[:, at:at + 2] = (v * factor).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)

    write(1.0)
    if target_std is not None:
        std = float(quants.dequantize(raw.reshape(rows, -1), qtype(name)).std())
        write(target_std / std)
    return raw.reshape(rows, -1)


def unit_field_std(name: str) -> float:
    """Std of the values of random blocks whose fp16 fields are N(0, 1) (to size fields for a target std)."""
    sample = random_k_blocks(4, 4096, name, np.random.default_rng(123))
    return float(quants.dequantize(sample, qtype(name)).std())


def write_random_flux_gguf(shapes: dict[str, tuple], path, quant: str = "Q4_0", *, prefix: str = "",
                           base: str = "BF16", seed: int = 0) -> Path:
    """A big city96-layout GGUF file of random valid data, written tensor by tensor (the writer holds one
    tensor at a time): for memory and speed measurements, where values only need a sane size (each
    weight ~ N(0, 1/fan_in) in spread)."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    field_unit = unit_field_std(quant)
    writer = gguf.GGUFWriter(str(path), "flux")
    plan = []
    for key, shape in shapes.items():
        name = city96_type(key, shape, quant, base)
        if name == "F32":
            writer.add_tensor_info(prefix + key, shape, np.dtype(np.float32), 4 * math.prod(shape))
        else:
            byte_shape = quants.quant_shape_to_byte_shape(shape, qtype(name))
            writer.add_tensor_info(prefix + key, byte_shape, np.dtype(np.uint8), math.prod(byte_shape),
                                   raw_dtype=qtype(name))
        plan.append((key, shape, name))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for key, shape, name in plan:
        std = 1.0 / math.sqrt(shape[-1]) if len(shape) == 2 else 0.1
        if name == "F32":
            data = rng.normal(0, std, shape).astype(np.float32)
        elif name == "BF16":
            dense = torch.from_numpy(rng.normal(0, std, shape).astype(np.float32)).to(torch.bfloat16)
            data = dense.view(torch.int16).numpy().view(np.uint8)
        else:
            data = random_k_blocks(shape[0], shape[1], name, rng)
            blocks = data.reshape(-1, gguf.GGML_QUANT_SIZES[qtype(name)][1])
            for at in FP16_FIELDS[name]:  # resize the N(0, 1) fields to the target spread
                field = blocks[:, at:at + 2].copy().view(np.float16).astype(np.float32) * (std / field_unit)
                blocks[:, at:at + 2] = field.astype(np.float16).view(np.uint8)
        writer.write_tensor_data(np.ascontiguousarray(data))
    writer.close()
    return path


def encode(weight: torch.Tensor, name: str, rng: np.random.Generator) -> np.ndarray:
    """The GGUF data of `weight` stored as type `name` (F32/F16/BF16 or a listed quantized type)."""
    x = weight.detach().float().numpy()
    if name == "F32":
        return x.astype(np.float32)
    if name == "F16":
        return x.astype(np.float16)
    if name in K_TYPES:
        return random_k_blocks(x.shape[0], x.shape[1], name, rng, target_std=float(x.std()) or 1.0)
    if name in QUANTIZABLE or name == "BF16":
        return quants.quantize(x, qtype(name))
    # Any other GGML type: random bytes of the right size (for files a loader must refuse).
    byte_shape = quants.quant_shape_to_byte_shape(x.shape, qtype(name))
    return rng.integers(0, 256, size=byte_shape, dtype=np.uint8)


def city96_type(key: str, shape, quant: str, base: str = "BF16") -> str:
    """Which type a city96-style FLUX file uses for a tensor."""
    if len(shape) == 1 or math.prod(shape) <= 1024:
        return "F32"
    if key.startswith(DENSE_PREFIXES):
        return base
    return quant


def write_flux_gguf(sd: dict[str, torch.Tensor], path, quant="Q8_0", *, prefix: str = "", base: str = "BF16",
                    types: dict[str, str] | None = None, seed: int = 0, alignment: int | None = None,
                    arch: str | None = "flux", metadata: dict | None = None) -> tuple[Path, dict[str, torch.Tensor]]:
    """Write `sd` (BFL names) as a GGUF file; `quant` is one type for every quantized tensor, or a callable
    key -> type, and `types` overrides single keys. Returns the path and, per BFL key, the float32 tensor
    the oracle dequantizes from what was written (the weights a loader must reproduce)."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch) if arch else _writer_without_arch(path)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, value in (metadata or {}).items():
        writer.add_key_value(key, *value)
    reference = {}
    for key, tensor in sd.items():
        name = (types or {}).get(key) or city96_type(key, tensor.shape, quant(key) if callable(quant) else quant,
                                                     base)
        data = encode(tensor, name, rng)
        if data.dtype == np.uint8:
            writer.add_tensor(prefix + key, data, raw_dtype=qtype(name))
        else:
            writer.add_tensor(prefix + key, data)
        if name in LISTED or name in ("F32", "F16", "BF16"):
            reference[key] = oracle_dequantize(data, name).reshape(tensor.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, reference


def _writer_without_arch(path: Path):
    """stable-diffusion.cpp style files carry no general.architecture."""
    writer = gguf.GGUFWriter(str(path), "flux")
    writer.kv_data[0].pop("general.architecture", None)
    return writer


def read_with_oracle(path) -> dict[str, tuple[str, list[int], np.ndarray]]:
    """The package's reader on a file: name -> (type name, logical torch-order shape, dequantized data)."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        kind = T(t.tensor_type).name
        shape = [int(d) for d in reversed(t.shape.tolist())]
        out[t.name] = (kind, shape, np.array(quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
    return out
