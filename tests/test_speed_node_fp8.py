"""The speed node's fp8 matmuls on a MODEL whose block linears the pack's loader stores as packed fp8, inside
the real ComfyUI 0.3.75 (in-process, CPU).

The engine plans fp8 matmuls only on CUDA GPUs of compute capability 8.9+, so on a CPU they are forced with
FLUX_JUICED_FP8_MATMUL=on: torch._scaled_mm runs on this PyTorch's CPU too. ComfyUI computes in float32 on a
CPU whatever the weights (it calls bf16 there "extremely slow"); the row-scaled fp8 matmuls take and write
bf16, so while loading, the harness makes the host compute in bf16 as it does on a GPU: its own --bf16-unet
option and no manual cast. Everything else is the host's and the pack's own loader, on the tiny random demo
transformer (flux_core.demo), loaded with weight_dtype fp8.
"""
from __future__ import annotations

import importlib
import logging
from types import SimpleNamespace

import pytest
import torch

from comfy_import import demo_conditioning, imported_pack, native_demo_model
from gguf_factory import one_torch_thread  # noqa: F401 (autouse: one thread for tiny tensors)
from transformer_factory import rel_l2
from flux_core.demo import demo_model_files
from flux_core.speed import presets

pytestmark = pytest.mark.host

PACK_MODULE = "flux_juiced_pack_fp8_test"
ENV, COMPILE_ENV = "FLUX_JUICED_FP8_MATMUL", "FLUX_JUICED_COMPILE"
LATENT = (1, 16, 16, 16)  # 128x128 pixels: 64 image tokens
STEPS, SEED = 10, 11
BLOCK_LINEARS = {"double": 8, "single": 2}  # per block: q/k/v, projection, 2 MLP linears per stream; linear1/2
MODULATIONS = {"double": 2, "single": 1}    # packed too, but one row per image: they keep the dequantize path
E4M3_RMS = 2.0 ** -4 / 3 ** 0.5             # RMS relative rounding error of e4m3 (3 mantissa bits)


@pytest.fixture(autouse=True)
def eager(monkeypatch):
    monkeypatch.setenv(COMPILE_ENV, "off")


@pytest.fixture(scope="module")
def pack(comfy):
    with imported_pack(PACK_MODULE) as module:
        assert "FluxJuicedSpeed" in module.NODE_CLASS_MAPPINGS, "the pack's nodes failed to import (see the log)"
        yield SimpleNamespace(
            speed=importlib.import_module(f"{PACK_MODULE}.nodes.speed_node"),
            ops=importlib.import_module(f"{PACK_MODULE}.nodes.quantized_ops"),
            precision=importlib.import_module(f"{PACK_MODULE}.nodes.host_precision"),
            models=importlib.import_module(f"{PACK_MODULE}.nodes.host_models"),
            fp8_linear=importlib.import_module(f"{PACK_MODULE}.flux_core.speed.fp8_linear"),
            quant_linear=importlib.import_module(f"{PACK_MODULE}.flux_core.quant.linear"))


@pytest.fixture(scope="module")
def fp8_model(pack, comfy):
    """The pack's transformer loader (host_models.load_model, the node's call) with weight_dtype fp8, the host
    computing in bf16 (see the module docstring)."""
    import comfy.model_management as mm

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mm.args, "bf16_unet", True)
        patch.setattr(mm, "unet_manual_cast", lambda *args, **kwargs: None)
        model = pack.models.load_model(str(demo_model_files()["transformer"]), "fp8")
    assert model.model.manual_cast_dtype is None and model.model_dtype() == torch.bfloat16
    return model


@pytest.fixture(scope="module")
def dense_model(comfy):
    """A native float32 MODEL (UNETLoader's own call): no packed layers."""
    return native_demo_model(comfy)


@pytest.fixture(scope="module")
def cond():
    return demo_conditioning()


def sample(model, cond, steps=STEPS):
    """The native KSampler path (euler, simple, cfg 1: one model call per step)."""
    import comfy.sample

    latent = torch.zeros(LATENT)
    noise = comfy.sample.prepare_noise(latent, SEED)
    negative = [[torch.zeros_like(cond[0][0]), dict(cond[0][1])]]
    return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", cond, negative, latent, seed=SEED,
                               disable_pbar=True)


def fp8_wrappers(model, pack):
    from comfy.patcher_extension import WrappersMP

    return model.get_wrappers(WrappersMP.DIFFUSION_MODEL, pack.precision.KEY)


class Spy:
    """Counts the scaled_mm calls (checking each against `emulate` of the same operands) and the dequantized
    weights."""

    def __init__(self, pack, monkeypatch):
        self.scaled, self.dequantized, self.excess, self.shapes = 0, 0, 0.0, set()
        real_mm, real_dequantize, emulate = (pack.fp8_linear.scaled_mm, pack.quant_linear.dequantize_rows,
                                             pack.fp8_linear.emulate)

        def scaled_mm(xq, xs, wq, ws, bias, out_dtype, *args, **kwargs):
            got = real_mm(xq, xs, wq, ws, bias, out_dtype, *args, **kwargs)
            want = emulate(xq, xs, wq, ws, bias, torch.float32)
            # within bf16 rounding of the float32 result (unit roundoff 2^-8), plus float32 summation order
            bound = 2.0 ** -8 * want.abs() + 1e-5 * want.abs().max()
            self.excess = max(self.excess, ((got.float() - want).abs() - bound).max().item())
            self.scaled += 1
            self.shapes.add((xq.dtype, wq.dtype, got.dtype, tuple(wq.shape)))
            return got

        def dequantize_rows(*args, **kwargs):
            self.dequantized += 1
            return real_dequantize(*args, **kwargs)

        monkeypatch.setattr(pack.fp8_linear, "scaled_mm", scaled_mm)
        monkeypatch.setattr(pack.quant_linear, "dequantize_rows", dequantize_rows)

    def reset(self):
        self.scaled = self.dequantized = 0


def layer_calls(model, cache) -> tuple[int, int]:
    """(block linear calls, modulation calls) of the last run: every call runs the first double block, a full
    call all the others."""
    net = model.model.diffusion_model
    first = {"double": 1, "single": 0}
    every = {"double": len(net.double_blocks), "single": len(net.single_blocks)}
    run = cache.last_run
    calls, full = run["model_calls"], run["full_model_calls"]

    def count(per_block):
        return sum(per_block[k] * (first[k] * calls + (every[k] - first[k]) * full) for k in per_block)

    return count(BLOCK_LINEARS), count(MODULATIONS)


def test_forced_fp8_matmuls_run_from_the_stored_fp8_weights(pack, fp8_model, cond, monkeypatch, caplog):
    """FLUX_JUICED_FP8_MATMUL=on: the packed fp8 block linears compute scaled_mm from their stored e4m3 bytes
    and row scales during the sampling of the node's MODEL, matching `emulate` within bf16 rounding; the input
    MODEL and any call outside the node's wrapper keep dequantizing.

    The final latent stays close to the same run without fp8 matmuls. Both runs use the same e4m3 weights; only
    the activations are rounded to e4m3 per token (3 mantissa bits: relative error up to 2^-4, RMS about
    2^-4/sqrt(3) ~ 3.6%), which gives each block linear's output about that RMS relative error. If all of it
    reached the velocity undiluted, the latent (the integral of the velocity) would carry the same relative
    error, so E4M3_RMS bounds it; the residual stream, the dense and modulation layers and the noise part of
    the latent dilute it further (measured 0.14% at 10 steps). Above 1e-4: the arithmetic really changed."""
    reference = sample(fp8_model, cond)  # the input MODEL, before any speed node
    spy = Spy(pack, monkeypatch)

    monkeypatch.setenv(ENV, "off")
    off, off_cache = pack.speed.apply_speed_mode(fp8_model, presets.JUICED)
    assert off_cache.acceleration["precision"] == "comfyui" and not fp8_wrappers(off, pack)
    without = sample(off, cond)
    assert spy.scaled == 0

    monkeypatch.setenv(ENV, "on")
    with caplog.at_level(logging.INFO, logger="flux_juiced.speed"):
        patched, cache = pack.speed.apply_speed_mode(fp8_model, presets.JUICED)
    choices = cache.acceleration
    layers = pack.precision.fp8_block_layers(patched)
    assert choices["precision"] == "fp8" and choices["fp8_layers"] == len(layers) == 20
    assert choices["fp8_request_from"] == ENV and f"{ENV}=on" in choices["precision_reason"]
    assert "not fp8: fp8 matmuls need a CUDA GPU" in choices["precision_reason"]  # the engine's own view
    assert len(fp8_wrappers(patched, pack)) == 1 and not fp8_wrappers(fp8_model, pack)
    assert "precision: fp8 matmuls in 20 packed fp8 block linears (engine: " in caplog.text

    spy.reset()
    with_fp8 = sample(patched, cond)
    blocks, modulations = layer_calls(patched, cache)
    print(f"\n{cache.last_run['pattern']}: {spy.scaled} scaled_mm calls, {spy.dequantized} dequantized; "
          f"rel L2 against the run without fp8 matmuls {rel_l2(with_fp8, without):.5f}")
    assert spy.scaled == blocks and spy.dequantized == modulations, (spy.scaled, spy.dequantized, blocks)
    assert {shape[:3] for shape in spy.shapes} == {(torch.float8_e4m3fn, torch.float8_e4m3fn, torch.bfloat16)}
    assert spy.excess <= 0, spy.excess
    assert 1e-4 < rel_l2(with_fp8, without) < E4M3_RMS

    # The input MODEL (same module objects) and calls outside the wrapper keep the dequantize path.
    spy.reset()
    assert torch.equal(sample(fp8_model, cond), reference)
    assert spy.scaled == 0 and spy.dequantized > 0
    net = fp8_model.model.diffusion_model
    layer, modulation = net.double_blocks[0].img_attn.qkv, net.double_blocks[0].img_mod.lin
    assert layer is layers[0] and modulation.storage == "fp8" and modulation not in layers
    x = torch.randn(3, 5, layer.in_features, dtype=torch.bfloat16)
    spy.reset()
    with torch.no_grad():
        outside = layer(x)
        with pack.ops.fp8_matmul_enabled(torch.device("cpu")):
            inside = layer(x)
            modulation(x)
    assert spy.scaled == 1 and spy.dequantized == 2
    fp8_linear = pack.fp8_linear
    xq, xs = fp8_linear.quantize_activations(x.reshape(-1, layer.in_features))
    want = fp8_linear.emulate(xq, xs, layer.qweight.view(torch.float8_e4m3fn), layer.scale, layer.bias,
                              torch.float32).reshape(3, 5, -1)
    torch.testing.assert_close(inside.float(), want, rtol=2 ** -8, atol=1e-5 * want.abs().max().item())
    dense = pack.quant_linear.dequantize_weight("fp8", layer.qweight, layer.scale, None,
                                                (layer.out_features, layer.in_features), torch.bfloat16)
    assert torch.equal(outside, torch.nn.functional.linear(x, dense, layer.bias.to(torch.bfloat16)))


def test_auto_on_a_cpu_says_why_not(pack, fp8_model, monkeypatch, caplog):
    monkeypatch.delenv(ENV, raising=False)
    with caplog.at_level(logging.INFO, logger="flux_juiced.speed"):
        patched, cache = pack.speed.apply_speed_mode(fp8_model, presets.JUICED)
    choices = cache.acceleration
    why = pack.fp8_linear.fp8_unsupported(torch.device("cpu"), torch.bfloat16)
    assert why and choices["fp8_reason"] == why and why in choices["precision_reason"]
    assert choices["precision"] == "comfyui" and choices["fp8_layers"] == 0 and not fp8_wrappers(patched, pack)
    assert choices["fp8_request_from"] == "speed mode" and choices["engine_precision"] != "fp8"
    assert f"precision: ComfyUI's ops, no fp8 matmuls from this node: {why}" in caplog.text
    # Lightly keeps the model's precision; off says so.
    lightly = pack.speed.apply_speed_mode(fp8_model, presets.LIGHTLY_JUICED)[1].acceleration
    assert "does not ask for fp8 matmuls" in lightly["fp8_reason"]
    monkeypatch.setenv(ENV, "off")
    assert pack.speed.apply_speed_mode(fp8_model, presets.BLINK)[1].acceleration["fp8_reason"] == f"{ENV}=off"
    # A later speed node that does not use fp8 matmuls takes the earlier one's wrapper off its clone.
    monkeypatch.setenv(ENV, "on")
    forced, _ = pack.speed.apply_speed_mode(fp8_model, presets.JUICED)
    monkeypatch.setenv(ENV, "off")
    again, _ = pack.speed.apply_speed_mode(forced, presets.JUICED)
    assert fp8_wrappers(forced, pack) and not fp8_wrappers(again, pack)
    # Float32 compute: the row-scaled matmuls take bf16.
    assert "bf16" in pack.precision.why_not(20, presets.JUICED, True, "cpu", torch.float32, "on")


def test_a_dense_model_is_told_to_load_fp8(pack, dense_model, cond, monkeypatch, caplog):
    monkeypatch.setenv(ENV, "on")
    spy = Spy(pack, monkeypatch)
    with caplog.at_level(logging.INFO, logger="flux_juiced.speed"):
        patched, cache = pack.speed.apply_speed_mode(dense_model, presets.EXTRA_JUICED)
    choices = cache.acceleration
    load = "load with weight_dtype fp8 in FLUX.1 Transformer Loader (Juiced) to get fp8 matmuls"
    assert choices["precision"] == "comfyui" and choices["fp8_layers"] == 0 and load in choices["fp8_reason"]
    assert load in choices["precision_reason"] and load in caplog.text
    assert not fp8_wrappers(patched, pack)
    sample(patched, cond, steps=6)
    assert spy.scaled == 0 and spy.dequantized == 0


def test_compiled_blocks_keep_the_fp8_matmuls_in_one_graph_per_block_kind(pack, fp8_model, cond, monkeypatch):
    """FLUX_JUICED_COMPILE=on with fp8 matmuls: the compiled blocks run scaled_mm (counted by a tensor the
    compiled graphs update in place), still one graph per block kind (the layers' switch is a plain value the
    graphs guard on, not a module identity, which would compile each block apart), and the latent matches the
    eager fp8 run up to bf16 rounding (inductor fuses the bf16 ops differently; measured 0.16%)."""
    from comfy.ldm.modules.attention import get_attention_function
    from torch._dynamo.utils import counters

    sdpa = get_attention_function("pytorch")  # as in test_speed_node: the host's CPU default breaks graphs
    base = fp8_model.clone()
    base.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = \
        lambda func, *args, **kwargs: sdpa(*args, **kwargs)
    monkeypatch.setenv(ENV, "on")
    eager, _ = pack.speed.apply_speed_mode(base, presets.JUICED)
    expected = sample(eager, cond)
    monkeypatch.setenv(COMPILE_ENV, "on")
    compiled, cache = pack.speed.apply_speed_mode(base, presets.JUICED)
    assert cache.acceleration["compile"] is True and cache.acceleration["precision"] == "fp8"

    calls, real_mm = torch.zeros((), dtype=torch.int64), pack.fp8_linear.scaled_mm

    def counted(*args, **kwargs):
        calls.add_(1)
        return real_mm(*args, **kwargs)

    monkeypatch.setattr(pack.fp8_linear, "scaled_mm", counted)
    torch._dynamo.reset()
    counters.clear()
    try:
        sample(compiled, cond)  # compiles
        calls.zero_()
        out = sample(compiled, cond)
        graphs, breaks = counters["stats"]["unique_graphs"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    err = rel_l2(out, expected)
    print(f"\ncompiled: {calls.item()} scaled_mm calls, {graphs} graphs, rel L2 {err:.5f} against eager fp8")
    assert calls.item() == layer_calls(compiled, cache)[0]
    assert graphs == 2 and not breaks, (graphs, breaks)
    assert err < 0.01, err


def test_the_all_in_one_node_loads_fp8_weights_only_where_its_mode_gets_fp8_matmuls(pack, monkeypatch):
    storage = pack.precision.transformer_storage
    cpu = torch.device("cpu")
    monkeypatch.delenv(pack.precision.ENV, raising=False)
    assert {storage(mode, cpu) for mode in presets.SPEED_MODES} == {"default"}  # auto: no fp8 matmuls on a CPU
    monkeypatch.setattr(pack.fp8_linear, "fp8_unsupported", lambda device, dtype: None)  # a GPU that has them
    assert [storage(mode, cpu) for mode in presets.SPEED_MODES] == ["default"] + ["fp8"] * 3  # not Lightly
    assert storage("off", cpu) == "default"
    monkeypatch.setenv(pack.precision.ENV, "off")
    assert storage(presets.SPEED_MODES[2], cpu) == "default"
    monkeypatch.setenv(pack.precision.ENV, "on")
    assert [storage(mode, cpu) for mode in presets.SPEED_MODES] == ["fp8"] * 4
