"""int8 / fp8 weight-only storage of bf16 checkpoints at load time: the row quantizers' error bounds, the
quantized Linear, and whole models numerically close to the bf16 model at about half its weight bytes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import transformer_factory as tf
from flux_core.cli import build_parser
from flux_core.loaders import load_transformer
from flux_core.quant import rowwise
from flux_core.quant.linear import QuantLinear, decode_spec, encode_spec
from flux_core.quant.loading import DENSE_PREFIXES, packed_state_dict, storage_report
from flux_core.quant.rowwise import dequantize_rows, quantize_rows
from gguf_factory import one_torch_thread  # noqa: F401 (autouse fixture)


def weight(seed=0, rows=48, cols=96):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * torch.logspace(-3, 1, rows)[:, None]  # rows of very different size
    w[5] = 0.0
    w[7, 3] = 40.0  # an outlier
    return w


def test_int8_rows_are_within_half_a_step():
    w = weight()
    q, scale = quantize_rows(w, "int8")
    assert q.dtype == torch.int8 and scale.shape == (w.shape[0], 1) and scale.dtype == torch.float32
    back = dequantize_rows(q, scale)
    assert ((back - w).abs() <= scale / 2 * (1 + 1e-6)).all()
    assert (q.abs().amax(dim=1)[w.abs().amax(dim=1) > 0] == 127).all()  # every row uses the full range
    assert torch.equal(back[5], torch.zeros(w.shape[1])) and scale[5].item() == 1.0
    # Straight into a compute dtype: the float32 product rounded once.
    assert torch.equal(dequantize_rows(q, scale, torch.bfloat16), back.to(torch.bfloat16))


def test_fp8_rows_keep_three_mantissa_bits():
    w = weight(1)
    q, scale = quantize_rows(w, "fp8")
    assert q.dtype == torch.float8_e4m3fn
    back = dequantize_rows(q, scale)
    scaled = (w / scale).abs()
    normal = scaled >= 2.0 ** -6  # e4m3's smallest normal
    rel = ((back - w).abs() / w.abs().clamp_min(1e-30))[normal]
    assert rel.max() <= 2.0 ** -4 + 1e-6
    assert ((back - w).abs()[~normal] <= 2.0 ** -10 * scale.expand_as(w)[~normal] * (1 + 1e-6)).all()
    assert q.float().abs().amax() == 448.0
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(dequantize_rows(q, scale, dtype), back.to(dtype))


def test_quantizing_leaves_the_input_alone_and_chunks_agree(monkeypatch):
    w = weight(2)
    keep = w.clone()
    whole = quantize_rows(w, "int8")
    assert torch.equal(w, keep)
    monkeypatch.setattr(rowwise, "CHUNK_ELEMENTS", 5 * w.shape[1] + 3)
    chunked = quantize_rows(w, "int8")
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    monkeypatch.setitem(rowwise.WORK_CHUNK, "cpu", 7 * w.shape[1] + 5)
    assert torch.equal(dequantize_rows(*whole, torch.bfloat16), (whole[0].float() * whole[1]).to(torch.bfloat16))
    with pytest.raises(ValueError, match="int8"):
        quantize_rows(w, "int4")


@pytest.mark.parametrize("storage", ["int8", "fp8"])
def test_quant_linear_is_a_linear_with_its_dequantized_weight(storage):
    w, b = weight(3), torch.randn(48)
    layer = QuantLinear.from_dense(w, b, storage)
    x = torch.randn(2, 5, 96)
    dense = layer.dequantized_weight(torch.float32)
    assert torch.equal(layer(x), F.linear(x, dense, b))
    # A module-wide dtype change must not upcast the packed bytes (fp8 is stored as uint8 for that reason).
    layer.to(torch.bfloat16)
    assert layer.qweight.dtype == (torch.int8 if storage == "int8" else torch.uint8)
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and ((y.float() - F.linear(x, dense, b)).norm() / y.float().norm()) < 0.02
    assert decode_spec(encode_spec(layer.spec())) == {"storage": storage, "type_id": None, "shape": [48, 96]}


@pytest.fixture(scope="module")
def bf16_file(tmp_path_factory):
    sd = {k: v.to(torch.bfloat16) for k, v in tf.random_bfl_state_dict(tf.TINY, seed=4).items()}
    return tf.write_bfl(sd, tmp_path_factory.mktemp("q") / "flux-bf16.safetensors", prefix="model.diffusion_model.")


# (relative L2 of the output against the dense model) measured ~0.009 int8, ~0.03 fp8 on this model; the
# bounds leave a margin but fail on a wrong scale, a transposed row or a lost bias.
BOUNDS = {"int8": 0.02, "fp8": 0.06}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("storage", ["int8", "fp8"])
def test_8bit_storage_is_close_to_the_bf16_model_at_half_the_bytes(bf16_file, storage, dtype):
    inputs = tf.make_inputs(tf.TINY, dtype=dtype)
    dense = load_transformer(bf16_file, dtype=dtype)
    packed = load_transformer(bf16_file, dtype=dtype, weights=storage)
    expected = tf.run_flux(dense, inputs).float()
    got = tf.run_flux(packed, inputs).float()
    error = ((got - expected).norm() / expected.norm()).item()
    assert error < BOUNDS[storage] * (1.5 if dtype == torch.bfloat16 else 1.0), error
    assert error > 1e-4  # it really was quantized

    layers = {n: m for n, m in packed.named_modules() if isinstance(m, QuantLinear)}
    linears = [n for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(layers) == sorted(n for n in linears if not n.startswith(DENSE_PREFIXES))
    assert all(layer.kind == storage for layer in layers.values())
    report = storage_report(packed)
    weights = sum(m.out_features * m.in_features for m in layers.values())
    rows = sum(m.out_features for m in layers.values())
    assert report["packed_bytes"] == weights + 4 * rows  # one byte a weight plus a float32 scale a row
    bf16_bytes = 2 * weights
    assert report["packed_bytes"] < 0.53 * bf16_bytes


def test_packed_state_dict_describes_every_packed_layer(bf16_file):
    model = load_transformer(bf16_file, dtype=torch.float32, weights="int8")
    state = packed_state_dict(model)
    specs = {k[: -len(".quant_spec")]: decode_spec(v) for k, v in state.items() if k.endswith(".quant_spec")}
    assert set(specs) == {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert all(state[n + ".qweight"].dtype == torch.int8 and state[n + ".scale"].shape == (s["shape"][0], 1)
               for n, s in specs.items())


def test_unknown_storage_is_refused(bf16_file):
    with pytest.raises(ValueError, match="weights must be one of auto, dense, int8, fp8"):
        load_transformer(bf16_file, weights="int4")


def test_cli_and_pipeline_pass_the_storage_through(bf16_file, monkeypatch):
    args = build_parser().parse_args(["generate", "--prompt", "x", "--weights", "int8"])
    assert args.weights == "int8"
    assert build_parser().parse_args(["generate", "--prompt", "x"]).weights == "auto"
    import flux_core.loaders as loaders
    from flux_core import pipeline

    seen = {}
    monkeypatch.setattr(loaders, "load_transformer", lambda path, **kw: seen.update(kw) or "transformer")
    monkeypatch.setattr(loaders, "load_autoencoder", lambda *a, **kw: "ae")
    monkeypatch.setattr(loaders, "load_text_encoders", lambda *a, **kw: "te")
    models = pipeline.load_models(bf16_file, "ae", "t5", "clip", weights="fp8")
    assert models.transformer == "transformer" and seen["weights"] == "fp8"
