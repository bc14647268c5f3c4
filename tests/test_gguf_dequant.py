"""Our torch GGML dequantization against the maintained `gguf` package's numpy reference, type by type.

Every listed type must match the reference bit for bit in float32: data from real weights where the
package can quantize (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, BF16), random valid blocks elsewhere (K types), with
scale fields spread from subnormal to large, so every bit field and every element position is exercised.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gguf_factory as gf
from gguf_factory import one_torch_thread  # noqa: F401 (autouse fixture)
from flux_core.quant import gguf_blocks, rowwise
from flux_core.quant.gguf_blocks import GGML_TYPES, dequantize

ROWS, COLS = 8, 1024


def sample(name: str, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """(GGUF data, the oracle's float32 dequantization) for one type."""
    rng = np.random.default_rng(seed)
    if name in gf.K_TYPES:
        data = gf.random_k_blocks(ROWS, COLS, name, rng)
        # Scale fields from subnormal to large magnitudes, both signs, and zero, on top of N(0, 1).
        blocks = data.reshape(-1, gguf_blocks.GGML_TYPES[int(gf.qtype(name))].type_size)
        specials = np.array([0.0, 6e-8, -3e-5, 1e-3, 250.0, -60000.0], dtype=np.float16).view(np.uint8)
        for i, at in enumerate(gf.K_FP16_FIELDS[name]):
            blocks[np.arange(6) * 4 + i, at:at + 2] = specials.reshape(6, 2)
    else:
        x = rng.normal(0, 0.05, (ROWS, COLS)).astype(np.float32)
        x[1] = 0.0                      # an all-zero row
        x[2, ::97] = [30.0, -12.0, 1e-7, -4.0, 0.5, 2.0, -1e-6, 7.0, -9.0, 3.0, 1e-3][: len(x[2, ::97])]
        data = gf.encode(torch.from_numpy(x), name, rng)
    return data, gf.oracle_dequantize(data, name).reshape(ROWS, COLS)


@pytest.mark.parametrize("name", gf.LISTED + ("BF16", "F16", "F32"))
def test_dequantize_matches_the_gguf_reference_exactly(name):
    data, reference = sample(name)
    type_id = int(gf.qtype(name))
    raw = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).copy())
    ours = dequantize(raw, type_id, (ROWS, COLS))
    assert ours.dtype == torch.float32 and ours.shape == (ROWS, COLS)
    assert torch.isfinite(reference).all()
    error = (ours - reference).abs().max().item()
    assert torch.equal(ours, reference), f"{name}: max |ours - gguf| = {error:.3g}"
    assert reference.abs().max() > 0  # not a vacuous comparison of zeros
    # Straight into a compute dtype: one rounding of the float32 values, nothing else.
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(dequantize(raw, type_id, (ROWS, COLS), dtype), reference.to(dtype)), (name, dtype)


@pytest.mark.parametrize("name", ["Q8_0", "Q5_1", "Q4_K", "Q6_K"])
def test_chunked_dequantization_matches_one_pass(name, monkeypatch):
    data, reference = sample(name, seed=3)
    raw = torch.from_numpy(data.copy())
    monkeypatch.setitem(rowwise.WORK_CHUNK, "cpu", 3 * 256 + 32)  # steps that do not divide the tensor
    assert torch.equal(dequantize(raw, int(gf.qtype(name)), (ROWS, COLS)), reference)


def test_every_listed_type_is_supported_and_sized_as_the_format_says():
    for name in gf.LISTED + ("BF16", "F16", "F32"):
        kind = GGML_TYPES[int(gf.qtype(name))]
        assert kind.name == name and kind.supported
        assert (kind.block_size, kind.type_size) == gf.gguf.GGML_QUANT_SIZES[gf.qtype(name)]


def test_unsupported_types_and_wrong_sizes_are_refused():
    with pytest.raises(ValueError, match="IQ4_NL is not supported"):
        dequantize(torch.zeros(18, dtype=torch.uint8), int(gf.qtype("IQ4_NL")), (32,))
    with pytest.raises(ValueError, match="type id 200"):
        dequantize(torch.zeros(18, dtype=torch.uint8), 200, (32,))
    with pytest.raises(ValueError, match="does not hold shape"):
        dequantize(torch.zeros(35, dtype=torch.uint8), int(gf.qtype("Q8_0")), (32,))
