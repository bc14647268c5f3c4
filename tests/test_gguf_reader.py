"""Our GGUF container reader against files the `gguf` package writes and its own reader's view of them:
metadata of every value type, shapes in torch order, alignment, raw bytes, and clear refusals of broken
or unsupported files."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gguf
import gguf_factory as gf
from gguf_factory import one_torch_thread  # noqa: F401 (autouse fixture)
from flux_core.checkpoints.gguf import GGUFFile, open_gguf
from flux_core.checkpoints.reader import open_checkpoint
from flux_core.errors import CheckpointError
from flux_core.loaders import read_part

V = gguf.GGUFValueType


def write(path, tensors: dict, metadata: dict | None = None, alignment: int | None = None):
    """tensors: name -> (type name, float32 array in torch order)."""
    writer = gguf.GGUFWriter(str(path), "flux")
    if alignment:
        writer.add_custom_alignment(alignment)
    for key, (value, vtype, *sub) in (metadata or {}).items():
        writer.add_key_value(key, value, vtype, *sub)
    rng = np.random.default_rng(0)
    for name, (kind, array) in tensors.items():
        if kind in gf.LISTED + ("BF16",) or kind.startswith("IQ"):
            data = (rng.integers(0, 256, (array.shape[0], gguf.quants.quant_shape_to_byte_shape(
                array.shape, gf.qtype(kind))[-1]), dtype=np.uint8) if kind.startswith("IQ")
                else gf.encode(torch.from_numpy(array), kind, rng))
            writer.add_tensor(name, data, raw_dtype=gf.qtype(kind))
        else:
            writer.add_tensor(name, array.astype(np.float16 if kind == "F16" else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tensors(rng=np.random.default_rng(1)):
    return {
        "a.weight": ("Q4_K", rng.normal(size=(4, 512)).astype(np.float32)),
        "b.weight": ("Q8_0", rng.normal(size=(3, 64)).astype(np.float32)),
        "c.bias": ("F32", rng.normal(size=(5,)).astype(np.float32)),
        "d.conv": ("F16", rng.normal(size=(2, 3, 4)).astype(np.float32)),
        "e.weight": ("BF16", rng.normal(size=(6, 32)).astype(np.float32)),
    }


@pytest.mark.parametrize("alignment", [None, 64])
def test_reader_agrees_with_the_gguf_package(tmp_path, alignment):
    metadata = {
        "t.u8": (7, V.UINT8), "t.i8": (-7, V.INT8), "t.u16": (700, V.UINT16), "t.i16": (-700, V.INT16),
        "t.u32": (70000, V.UINT32), "t.i32": (-70000, V.INT32), "t.f32": (0.5, V.FLOAT32), "t.bool": (True, V.BOOL),
        "t.str": ("juicy é", V.STRING), "t.u64": (2**40, V.UINT64), "t.i64": (-(2**40), V.INT64),
        "t.f64": (0.25, V.FLOAT64), "t.ints": ([1, 2, 3], V.ARRAY, V.INT32), "t.strs": (["x", "yz"], V.ARRAY, V.STRING),
    }
    path = write(tmp_path / "m.gguf", tensors(), metadata, alignment)
    oracle = gf.read_with_oracle(path)
    with open_gguf(path) as f:
        assert f.version == 3
        assert f.metadata["general.architecture"] == "flux"
        for key, (value, *_) in metadata.items():
            assert f.metadata[key] == value, key
        assert set(f.keys()) == set(oracle)
        reader = gguf.GGUFReader(str(path))
        for t in reader.tensors:
            kind, shape, values = oracle[t.name]
            assert list(f.shape(t.name)) == shape and f.type_name(t.name) == kind
            ours = f.read(t.name)
            assert torch.equal(ours.float().reshape(-1), torch.from_numpy(values.reshape(-1))), t.name
            if f.is_quantized(t.name):
                packed = f.read_packed(t.name)
                assert packed.data.shape[0] == shape[0] and packed.type_id == int(t.tensor_type)
                assert packed.data.numpy().tobytes() == np.ascontiguousarray(t.data).tobytes()
                assert torch.equal(packed.dequantize().reshape(-1), ours.reshape(-1))
        assert f.shape("d.conv") == (2, 3, 4) and f.dtype("d.conv") == torch.float16
        if alignment:
            assert all(i.begin % alignment == 0 for i in f.tensors.values())


def test_original_shape_metadata_overrides_the_stored_shape(tmp_path):
    meta = {"comfy.gguf.orig_shape.b.weight": ([3, 2, 32], V.ARRAY, V.INT32)}
    path = write(tmp_path / "o.gguf", tensors(), meta)
    with open_gguf(path) as f:
        assert f.shape("b.weight") == (3, 2, 32)
        assert f.tensors["b.weight"].stored_shape == (3, 64)
        assert torch.equal(f.read("b.weight").reshape(3, 64),
                           torch.from_numpy(gf.read_with_oracle(path)["b.weight"][2]).reshape(3, 64))


def test_broken_files_are_refused_with_the_reason(tmp_path):
    path = write(tmp_path / "ok.gguf", tensors())
    data = path.read_bytes()

    def broken(name, content):
        p = tmp_path / name
        p.write_bytes(content)
        return p

    cases = [
        (broken("cut.gguf", data[:-40]), "truncated.*tensor 'e.weight'"),
        (broken("header.gguf", data[:60]), "cut short"),
        (broken("magic.gguf", b"GGUX" + data[4:]), "not a GGUF file"),
        (broken("v1.gguf", data[:4] + (1).to_bytes(4, "little") + data[8:]), "GGUF version 1 is not supported"),
        (broken("be.gguf", data[:4] + (3).to_bytes(4, "big") + data[8:]), "big-endian"),
    ]
    for p, message in cases:
        with pytest.raises(CheckpointError, match=message) as info:
            GGUFFile(p)
        assert str(p) in str(info.value)


def test_unsupported_type_names_file_tensor_and_type(tmp_path):
    t = tensors()
    t["z.weight"] = ("IQ4_NL", np.zeros((2, 64), np.float32))
    path = write(tmp_path / "iq.gguf", t)
    with pytest.raises(CheckpointError) as info:
        GGUFFile(path)
    message = str(info.value)
    assert str(path) in message and "'z.weight'" in message and "IQ4_NL" in message and "Q4_K" in message


def test_gguf_is_for_transformers_only(tmp_path):
    path = write(tmp_path / "t5xxl-Q8_0.gguf", tensors())
    with pytest.raises(CheckpointError, match="supported for the FLUX transformer only"):
        open_checkpoint(path)
    with pytest.raises(CheckpointError, match="supported for the FLUX transformer only"):
        read_part(path, "t5")
    with pytest.raises(CheckpointError, match="this is not a FLUX transformer"):
        read_part(path, "transformer")
