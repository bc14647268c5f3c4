"""GGUF FLUX transformers through load_transformer: kept quantized in memory, dequantized layer by layer,
and numerically the weights the `gguf` package's reference dequantization gives.

Files are written by the gguf package in city96's FLUX convention (tests/gguf_factory.py), from a tiny
random model with the real key layout (hidden 256, head size 128, 2 double + 2 single blocks).
"""
from __future__ import annotations

import pytest
import torch

import gguf_factory as gf
from gguf_factory import one_torch_thread  # noqa: F401 (autouse fixture)
import transformer_factory as tf
from flux_core.errors import CheckpointError
from flux_core.loaders import load_transformer
from flux_core.quant.linear import QuantLinear
from flux_core.quant.loading import storage_report


@pytest.fixture(scope="module")
def weights():
    return tf.random_bfl_state_dict(tf.TINY, seed=0)


@pytest.fixture(scope="module")
def inputs():
    return tf.make_inputs(tf.TINY)


def block_linears(sd) -> list[str]:
    """Linear layers city96 quantizes: every 2-D weight outside the input/output layers."""
    return sorted(k[: -len(".weight")] for k, v in sd.items()
                  if k.endswith(".weight") and v.ndim == 2 and not k.startswith(gf.DENSE_PREFIXES))


def mixed_types(sd):
    """Every listed type, each on at least two layers."""
    layers = block_linears(sd)
    assigned = {layer + ".weight": gf.LISTED[i % len(gf.LISTED)] for i, layer in enumerate(layers)}
    assert len(layers) >= 2 * len(gf.LISTED)
    return assigned


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("layout", ["bare", "comfy_prefix", "no_architecture"])
def test_every_listed_type_stays_packed_and_equals_the_oracle(tmp_path, weights, inputs, layout):
    types = mixed_types(weights)
    path, reference = gf.write_flux_gguf(
        weights, tmp_path / "flux-mixed.gguf", "Q8_0", types=types,
        prefix="model.diffusion_model." if layout == "comfy_prefix" else "",
        arch=None if layout == "no_architecture" else "flux")
    model = load_transformer(path, dtype=torch.float32)

    packed = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert sorted(packed) == block_linears(weights)
    sizes = {}
    for name, layer in packed.items():
        assert layer.kind == types[name + ".weight"] and layer.qweight.dtype == torch.uint8
        assert torch.equal(layer.dequantized_weight(torch.float32), reference[name + ".weight"]), name
        sizes[name] = layer.qweight.numel()
    # The packed bytes are the file's bytes: nothing was expanded on the way in.
    from flux_core.checkpoints.gguf import open_gguf
    with open_gguf(path) as f:
        prefix = "model.diffusion_model." if layout == "comfy_prefix" else ""
        assert all(sizes[n] == f.tensors[prefix + n + ".weight"].nbytes for n in sizes)
    assert set(storage_report(model)["packed_layers"]) == set(gf.LISTED)

    expected = tf.run_flux(tf.flux_from_state_dict(reference), inputs)
    got = tf.run_flux(model, inputs)
    assert expected.abs().mean() > 0.1
    assert (got - expected).abs().max().item() <= 1e-5


def test_bf16_compute_is_the_oracle_weights_rounded_once(tmp_path, weights):
    path, reference = gf.write_flux_gguf(weights, tmp_path / "flux-Q4_K.gguf", "Q4_K", base="F16")
    inputs = tf.make_inputs(tf.TINY, dtype=torch.bfloat16)
    model = load_transformer(path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    expected = tf.run_flux(tf.flux_from_state_dict(reference).to(torch.bfloat16), inputs)
    assert torch.equal(tf.run_flux(model, inputs), expected)


def test_quantized_files_stay_close_to_the_original_weights(tmp_path, weights, inputs):
    """Files quantized from the weights (the package's quantizer): output error tracks the format's
    precision, Q8_0 best, 4-bit worst."""
    original = tf.run_flux(tf.flux_from_state_dict(weights), inputs)
    bounds = {"Q8_0": 0.01, "Q5_1": 0.07, "Q5_0": 0.08, "Q4_1": 0.12, "Q4_0": 0.13}
    errors = {}
    for name, bound in bounds.items():
        path, reference = gf.write_flux_gguf(weights, tmp_path / f"flux-{name}.gguf", name)
        worst_weight = max(rel(reference[k], weights[k]) for k in reference if weights[k].ndim == 2)
        errors[name] = rel(tf.run_flux(load_transformer(path, dtype=torch.float32), inputs), original)
        assert errors[name] < bound, (name, errors[name])
        assert errors[name] < 1.5 * worst_weight + 1e-3, (name, errors[name], worst_weight)
    assert errors["Q8_0"] < errors["Q5_1"] < errors["Q4_0"]


def test_dense_storage_expands_gguf_to_the_same_numbers(tmp_path, weights, inputs):
    path, _ = gf.write_flux_gguf(weights, tmp_path / "flux-Q5_K.gguf", "Q5_K")
    packed = load_transformer(path, dtype=torch.float32)
    dense = load_transformer(path, dtype=torch.float32, weights="dense")
    assert not any(isinstance(m, QuantLinear) for m in dense.modules())
    assert torch.equal(tf.run_flux(packed, inputs), tf.run_flux(dense, inputs))
    report_packed, report_dense = storage_report(packed), storage_report(dense)
    # Q5_K is 5.5 bits a weight against 32 for the expanded float32 copy.
    assert report_packed["packed_bytes"] < 0.2 * (report_dense["total_bytes"] - report_packed["dense_bytes"])


def test_unsupported_type_is_one_clear_error(tmp_path, weights):
    path, _ = gf.write_flux_gguf(weights, tmp_path / "flux-iq.gguf", "Q8_0",
                                 types={"single_blocks.1.linear2.weight": "IQ4_NL"})
    with pytest.raises(CheckpointError) as info:
        load_transformer(path)
    message = str(info.value)
    assert str(path) in message and "'single_blocks.1.linear2.weight'" in message and "IQ4_NL" in message


def test_incomplete_gguf_is_refused_before_reading(tmp_path, weights):
    partial = {k: v for k, v in weights.items() if k != "double_blocks.1.txt_mlp.2.weight"}
    path, _ = gf.write_flux_gguf(partial, tmp_path / "flux-partial.gguf", "Q8_0")
    with pytest.raises(CheckpointError, match="incomplete.*double_blocks.1.txt_mlp.2.weight"):
        load_transformer(path)
