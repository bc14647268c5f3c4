"""The runtime part of the speed modes (flux_core.speed.runtime): attention backends, compilation, matmul
precision (fp32 compute on CPUs without bf16 instructions, fp8 with per-row scales), what each chooses
and why, the clean fallbacks on this CPU and on simulated other machines, and determinism per preset.

No GPU here: the fp8 numerics are checked on the CPU against the same formula in float32, and torch's own
CPU torch._scaled_mm checks that the call (layouts, scale shapes, bias) is the one the GPU would get.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import flux_core
import transformer_factory as tf
from flux_core import model as flux_model
from flux_core.demo import demo_model_files
from flux_core.pipeline import load_models
from flux_core.speed import attention as attn
from flux_core.speed import compile as comp
from flux_core.quant.rowwise import quantize_rows
from flux_core.speed import fp8_linear, presets, runtime
from flux_core.speed import precision as prec

P = tf.TINY


def _model(dtype=torch.float32, seed=0):
    return tf.flux_from_state_dict(tf.random_bfl_state_dict(P, seed=seed), P).to(dtype).requires_grad_(False)


def _inputs(dtype=torch.float32, **kw):
    return tf.make_inputs(P, dtype=dtype, **kw)


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# --------------------------------------------------------------------------------------------------
# The model's fast paths compute the reference's numbers


def test_rope_as_cos_sin_pairs_is_the_reference_rotation():
    ids = _inputs()["img_ids"]
    matrices = flux_model.embed_positions(ids, P.axes_dim, P.theta)
    factors = flux_model.rope_factors(ids, P.axes_dim, P.theta)
    assert factors.dtype == torch.float32 and factors.shape == matrices.shape[:-1]
    assert torch.equal(factors[..., 0], matrices[..., 0, 0]) and torch.equal(factors[..., 1], matrices[..., 1, 0])
    assert torch.equal(-factors[..., 1], matrices[..., 0, 1]) and torch.equal(factors[..., 0], matrices[..., 1, 1])
    x = torch.randn(2, P.num_heads, ids.shape[1], P.head_dim, generator=torch.Generator().manual_seed(0))
    by_matrix, by_pairs = flux_model.apply_rope(x, matrices), flux_model.apply_rope(x, factors)
    by_real = flux_model._rotate_real(x, factors)  # the formula compiled blocks use
    torch.testing.assert_close(by_pairs, by_matrix, rtol=0, atol=1e-6)
    torch.testing.assert_close(by_real, by_matrix, rtol=0, atol=1e-6)
    in_place = x.clone()
    assert flux_model._rope_(in_place, factors) is in_place and torch.equal(in_place, by_pairs)
    assert _rel(by_matrix, x) > 0.1  # the rotation does something


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_into_a_joint_buffer_is_bit_identical(dtype):
    norm = flux_model.RMSNorm(P.head_dim).to(dtype)
    norm.scale.data.uniform_(0.5, 1.5)
    qkv = torch.randn(2, 9, 3 * P.hidden_size, generator=torch.Generator().manual_seed(1)).to(dtype)
    q = flux_model.split_heads(qkv, P.num_heads)[0]  # a strided view, as in the blocks
    joint = torch.zeros(2, P.num_heads, 12, P.head_dim, dtype=dtype)
    norm.into(q, joint[:, :, 3:])
    assert torch.equal(joint[:, :, 3:], norm(q)) and not joint[:, :, :3].any()


# --------------------------------------------------------------------------------------------------
# Attention backends


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_attention_backends_agree_with_the_math_reference(dtype, tol):
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 77, 128, generator=gen).to(dtype) for _ in range(3))
    reference = attn.math_attention(q.double(), k.double(), v.double())
    for name in ("sdpa", "math"):
        out = attn.AttentionChoice(name, "test").fn(q, k, v)
        assert out.dtype == dtype and out.shape == q.shape
        assert (out.double() - reference).abs().max().item() < tol, name
    wrong = (attn.sdpa(q, k, v.flip(2)).double() - reference).abs().max().item()  # v rows out of order
    assert wrong > 0.5 and wrong > 20 * tol  # the check bites


def test_blocks_use_the_chosen_backend_and_the_default_path_is_untouched():
    model, x = _model(), _inputs()
    default = tf.run_flux(model, x)
    attn.set_attention(model, attn.AttentionChoice("math", "test"))
    assert all(b.attn_backend is attn.math_attention for b in list(model.double_blocks) + list(model.single_blocks))
    torch.testing.assert_close(tf.run_flux(model, x), default, rtol=0, atol=2e-5)
    attn.set_attention(model, attn.choose_attention("cpu", torch.float32))
    assert "attn_backend" not in model.double_blocks[0].__dict__  # back to the class default (plain SDPA)
    assert torch.equal(tf.run_flux(model, x), default)


def test_sage_is_chosen_only_where_it_can_run(monkeypatch):
    cpu = attn.choose_attention("cpu", torch.bfloat16, "sage")
    assert cpu.name == "sdpa" and "CUDA" in cpu.reason and "SageAttention" in cpu.reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    turing = attn.choose_attention("cuda", torch.bfloat16, "sage")
    assert turing.name == "sdpa" and "8.0" in turing.reason and "7.5" in turing.reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(attn, "_sage_module", lambda: None)
    assert "not installed" in attn.choose_attention("cuda", torch.bfloat16, "sage").reason
    assert "fp16/bf16" in attn.choose_attention("cuda", torch.float32, "sage").reason

    calls = []

    class FakeSage:  # stands in for the package: the wiring is what is tested here
        @staticmethod
        def sageattn(q, k, v, tensor_layout, is_causal):
            assert tensor_layout == "HND" and not is_causal
            calls.append(q.shape)
            return F.scaled_dot_product_attention(q, k, v)

    monkeypatch.setattr(attn, "_sage_module", lambda: FakeSage)
    chosen = attn.choose_attention("cuda", torch.bfloat16, "sage")
    assert chosen.name == "sage"
    model, x = _model(), _inputs()
    default = tf.run_flux(model, x)
    attn.set_attention(model, chosen)
    assert torch.equal(tf.run_flux(model, x), default)
    assert len(calls) == P.depth + P.depth_single_blocks
    with pytest.raises(ValueError, match="attention"):
        attn.choose_attention("cpu", torch.float32, "flash4")


# --------------------------------------------------------------------------------------------------
# fp8 with per-row scales


def _problem(seed=3, m=64, n=96, k=256, spread=None):
    """bf16 activations x (m, k) ~ N(0, 1) and weights w (n, k) ~ N(0, 1/k); with `spread`, every 16th
    weight row and token 5 are that many times larger (outliers)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) / math.sqrt(k)
    x = torch.randn(m, k, generator=gen)
    if spread:
        w[::16] *= spread
        x[5] *= spread
    return x.bfloat16(), w.bfloat16()


def _per_tensor(t):
    scale = t.float().abs().amax() / fp8_linear.E4M3_MAX
    return (t.float() / scale).to(fp8_linear.E4M3), scale.reshape(1, 1)


def test_row_scales_quantize_within_e4m3_resolution():
    x, w = _problem(spread=1e3)
    wq, ws = quantize_rows(w, "fp8")
    assert wq.dtype == fp8_linear.E4M3 and ws.shape == (w.shape[0], 1) and ws.dtype == torch.float32
    assert torch.equal(wq.float().abs().amax(dim=1), torch.full((w.shape[0],), 448.0))  # every row uses the range
    # dequantized: at most half an e4m3 step (2^-4 relative) off, wherever e4m3 holds the value as a normal number
    back, normal = wq.float() * ws, w.float().abs() >= ws * 2.0 ** -6
    assert normal.float().mean() > 0.95
    assert ((back - w.float()).abs()[normal] / w.float().abs()[normal]).max().item() <= 2.0 ** -4 + 1e-6
    zq, zs = fp8_linear.quantize_activations(torch.zeros(2, 16))
    assert not zq.float().any() and (zs > 0).all()


# e4m3 keeps 3 mantissa bits: rounding moves a value by up to 2^-4 relative, 2^-4 / sqrt(3) = 3.6% RMS at
# most; errors of the two operands add in quadrature over a dot product, so a product's relative error
# stays below sqrt(2) x 3.6% = 5.1%. Measured on these problems: 3.6%.
FP8_BOUND = math.sqrt(2) * 2.0 ** -4 / math.sqrt(3)


def test_fp8_rowwise_matmul_stays_within_e4m3_error_of_the_bf16_product():
    x, w = _problem()
    exact = x.float() @ w.float().t()
    (xq, xs), (wq, ws) = fp8_linear.quantize_activations(x), quantize_rows(w, "fp8")
    err = _rel(fp8_linear.emulate(xq, xs, wq, ws, None, torch.float32), exact)
    print(f"\nrow-wise fp8 vs the bf16 operands' exact product: rel L2 {err:.4f} (bound {FP8_BOUND:.4f})")
    assert 0.01 < err < FP8_BOUND  # (above 1%: the quantization really happened)


def test_row_scales_keep_outliers_from_starving_the_other_rows():
    """Weight rows and a token 1e5 times larger than the rest: a spread no single e4m3 scale can hold
    (its range is 2^-9 .. 448), so one scale per tensor pushes the ordinary values into subnormals."""
    x, w = _problem(spread=1e5)
    exact = x.float() @ w.float().t()
    (xq, xs), (wq, ws) = fp8_linear.quantize_activations(x), quantize_rows(w, "fp8")
    (xt, xts), (wt, wts) = _per_tensor(x), _per_tensor(w)
    rows = torch.ones(x.shape[0], dtype=torch.bool)
    rows[5] = False
    cols = torch.ones(w.shape[0], dtype=torch.bool)
    cols[::16] = False

    def ordinary_error(out):  # on the outputs of ordinary tokens and ordinary weight rows
        return _rel(out[rows][:, cols], exact[rows][:, cols])

    row_err = ordinary_error(fp8_linear.emulate(xq, xs, wq, ws, None, torch.float32))
    tensor_err = ordinary_error(fp8_linear.emulate(xt, xts, wt, wts, None, torch.float32))
    print(f"\nordinary outputs next to 1e5 outliers: row-wise {row_err:.4f}, one scale per tensor {tensor_err:.4f}")
    assert row_err < FP8_BOUND and tensor_err > 5 * row_err


def test_fp8_linear_calls_scaled_mm_as_the_formula_says():
    x, w = _problem(seed=4)
    linear = torch.nn.Linear(w.shape[1], w.shape[0]).bfloat16().requires_grad_(False)
    linear.weight.copy_(w)
    original = linear(x.unsqueeze(0))
    fp8_linear.to_fp8(linear)
    assert isinstance(linear, fp8_linear.Fp8Linear) and linear.weight.dtype == fp8_linear.E4M3
    assert set(linear.state_dict()) == {"weight", "bias", "weight_scale"}
    try:
        out = linear(x.unsqueeze(0))
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"this PyTorch has no CPU torch._scaled_mm: {error}")
    assert out.shape == original.shape and out.dtype == torch.bfloat16
    xq, xs = fp8_linear.quantize_activations(x)
    expected = fp8_linear.emulate(xq, xs, linear.weight, linear.weight_scale, linear.bias, torch.float32)
    # torch's kernel and the formula differ only by the bf16 rounding of the result
    torch.testing.assert_close(out[0].float(), expected, rtol=2 ** -8, atol=1e-3 * expected.abs().max().item())
    assert _rel(out, original) < FP8_BOUND
    with pytest.raises(ValueError, match="16"):
        fp8_linear.to_fp8(torch.nn.Linear(20, 32))


def test_fp8_on_the_whole_model_quantizes_the_block_linears_only():
    model, x = _model(torch.bfloat16), _inputs(torch.bfloat16)
    reference = tf.run_flux(model, x)
    count = fp8_linear.quantize_model(model)
    assert count == 8 * P.depth + 2 * P.depth_single_blocks
    assert model.double_blocks[0].img_mod.lin.weight.dtype == torch.bfloat16  # one row per image: kept
    assert model.single_blocks[0].linear1.weight.dtype == fp8_linear.E4M3
    try:
        out = tf.run_flux(model, x)
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"this PyTorch has no CPU torch._scaled_mm: {error}")
    print(f"\nfp8 tiny model vs bf16: rel L2 {_rel(out, reference):.4f}")
    # measured 3.3%; the kernel call itself is checked layer by layer in the test above
    assert 0.005 < _rel(out, reference) < 2 * FP8_BOUND


# --------------------------------------------------------------------------------------------------
# fp32 compute for half-precision weights on CPUs without half-precision matrix instructions


def test_fp32_compute_linears_keep_weights_and_match_bf16():
    model, x = _model(torch.bfloat16), _inputs(torch.bfloat16)
    native = tf.run_flux(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    changed = prec.set_fp32_compute(model)
    assert changed == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    widened = tf.run_flux(model, x)
    state = model.state_dict()
    assert all(torch.equal(state[k], before[k]) and state[k].dtype == torch.bfloat16 for k in before)
    print(f"\nfp32 compute vs native bf16: rel L2 {_rel(widened, native):.4f}")
    assert 0 < _rel(widened, native) < 0.02  # bf16 rounding of the intermediate results, no more
    one_row = torch.randn(1, P.hidden_size).bfloat16()  # modulation-sized: stays on the native kernel
    lin = model.double_blocks[0].img_mod.lin
    assert torch.equal(lin(one_row), F.linear(one_row, lin.weight, lin.bias))
    assert prec.set_fp32_compute(model, on=False) == changed
    assert torch.equal(tf.run_flux(model, x), native)


# --------------------------------------------------------------------------------------------------
# Choices and fallbacks


@pytest.mark.parametrize("mode", presets.SPEED_MODES)
def test_every_mode_on_this_cpu_says_what_it_chose(mode):
    report = runtime.plan(mode, "cpu", torch.bfloat16)
    assert report.attention.name == "sdpa" and "CPU" in report.attention.reason
    assert not report.compile.enabled and "CPU" in report.compile.reason
    expected = "native" if prec.cpu_has_half_matmul(torch.bfloat16) else "fp32-compute"
    assert report.precision.name == expected
    if presets.MODES[mode].precision == "fp8":
        assert "not fp8" in report.precision.reason and "CUDA" in report.precision.reason
    if presets.MODES[mode].attention == "sage":
        assert "not SageAttention" in report.attention.reason
    assert runtime.plan(mode, "cpu", torch.float32).precision.name == "native"
    summary = report.summary()
    assert set(summary) >= {"attention", "attention_reason", "compile", "compile_reason", "precision",
                            "precision_reason", "fused_qkv"}


def test_presets_map_to_runtime_requests():
    requests = {m: (presets.MODES[m].compile, presets.MODES[m].precision, presets.MODES[m].attention)
                for m in presets.SPEED_MODES}
    assert requests == {presets.LIGHTLY_JUICED: ("auto", "auto", "sdpa"), presets.JUICED: ("auto", "fp8", "sdpa"),
                        presets.EXTRA_JUICED: ("auto", "fp8", "sdpa"), presets.BLINK: ("auto", "fp8", "sage")}
    assert runtime.options_for("off") == runtime.RuntimeOptions("sdpa", "off", "native")
    assert runtime.options_for("juiced") == presets.MODES[presets.JUICED].runtime


def test_simulated_older_gpus_windows_and_missing_tools_fall_back_with_reasons(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    ampere = runtime.plan("juiced", "cuda:0", torch.bfloat16).precision
    assert ampere.name == "native" and "8.6" in ampere.reason and "8.9" in ampere.reason
    fp16 = prec.choose_precision("cuda:0", torch.float16, "fp8")
    assert fp16.name == "native" and "bf16" in fp16.reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fp8_linear.scaled_mm_probe.cache_clear()  # no GPU here: the probe's kernel call fails, and that is a clean fallback
    hopper = prec.choose_precision("cuda:0", torch.bfloat16, "fp8")
    fp8_linear.scaled_mm_probe.cache_clear()
    assert hopper.name == "native" and "not available here" in hopper.reason

    monkeypatch.setattr(comp, "_has_triton", lambda: False)
    monkeypatch.setattr(comp.platform, "system", lambda: "Windows")
    windows = comp.choose_compile("cuda:0")
    assert not windows.enabled and "Windows" in windows.reason and "Triton" in windows.reason
    monkeypatch.setattr(comp.platform, "system", lambda: "Linux")
    assert "not installed" in comp.choose_compile("cuda:0", "on").reason
    monkeypatch.setattr(comp, "_has_triton", lambda: True)
    assert comp.choose_compile("cuda:0").enabled  # "auto" compiles on a GPU with Triton
    monkeypatch.setattr(comp, "_has_cxx", lambda: False)
    assert "C++ compiler" in comp.choose_compile("cpu", "on").reason
    assert "mps" in comp.choose_compile("mps").reason
    assert comp.choose_compile("cpu", "off").reason.startswith("compilation off")


def test_accelerate_on_this_cpu_is_idempotent_and_off_restores(monkeypatch):
    model = _model(torch.bfloat16)
    report = runtime.accelerate(model, "juiced")
    assert runtime.current(model) is report and report.device == "cpu" and report.dtype == "bfloat16"
    widened = prec.cpu_has_half_matmul(torch.bfloat16) is False
    linear_types = {type(m) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert linear_types == ({prec.Fp32ComputeLinear} if widened else {torch.nn.Linear})
    assert runtime.accelerate(model, "juiced") == report  # nothing more happens
    off = runtime.accelerate(model, "off")
    assert off.precision.name == "native" and not off.compile.enabled
    assert {type(m) for m in model.modules() if isinstance(m, torch.nn.Linear)} == {torch.nn.Linear}
    streamed = runtime.accelerate(_model(torch.bfloat16), runtime.RuntimeOptions(compile="on"), streamed=True)
    assert not streamed.compile.enabled and "streamed" in streamed.compile.reason


# --------------------------------------------------------------------------------------------------
# Compilation


def _graph_counter():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return graphs, backend


def test_compiled_blocks_do_not_recompile_for_every_aspect_ratio():
    """Block-level compile with automatic dynamic shapes: a graph per block kind for the first image size,
    one more at the second (token counts become symbolic), none for any later aspect ratio. (A new batch
    size or prompt length, fixed at 512 tokens in FLUX, costs one more graph per changed dimension, once.)"""
    import torch._dynamo

    if comp.compile_unavailable("cpu"):
        pytest.skip(comp.compile_unavailable("cpu"))
    torch._dynamo.reset()
    graphs, backend = _graph_counter()
    model, eager = _model(), _model()
    assert comp.compile_blocks(model, comp.CompileChoice(True, "test", backend=backend)) == 4
    assert all(comp.is_compiled(b) for b in model.double_blocks) and not comp.is_compiled(eager.double_blocks[0])
    counts = []
    for rows, cols in ((4, 4), (3, 5), (6, 2), (2, 7), (5, 5)):  # 1:1, 3:5, 3:1, 2:7, 1:1 again, larger
        x = _inputs(rows=rows, cols=cols, batch=1)
        torch.testing.assert_close(tf.run_flux(model, x), tf.run_flux(eager, x), rtol=0, atol=1e-6)
        counts.append(len(graphs))
    torch._dynamo.reset()
    print(f"\ncompiled graphs after each image size: {counts}")
    assert counts == [2, 4, 4, 4, 4]


@pytest.mark.slow
def test_inductor_on_this_cpu_matches_eager():
    """The real thing (C++ kernels) on one single block: ~20-40 s of compilation on 2 busy cores."""
    import torch._dynamo

    why_not = comp.compile_unavailable("cpu")
    if why_not:
        pytest.skip(why_not)
    torch._dynamo.reset()
    model, x = _model(), _inputs(batch=1)
    block = model.single_blocks[0]
    tokens = torch.randn(1, 20, P.hidden_size, generator=torch.Generator().manual_seed(5))
    vec = torch.randn(1, P.hidden_size, generator=torch.Generator().manual_seed(6))
    pe = model.positions(x["img_ids"][:, :13], x["txt_ids"][:, :7])
    with torch.no_grad():
        expected = block(tokens, vec, pe)
        block.compile(backend="inductor", dynamic=None)
        got = block(tokens, vec, pe)
    torch._dynamo.reset()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Through generate(): settings and determinism


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    paths = demo_model_files(tmp_path_factory.mktemp("demo"))
    return {dtype: load_models(paths["transformer"], paths["autoencoder"], paths["t5"], paths["clip"], dtype=dtype)
            for dtype in (torch.float32, torch.bfloat16)}


def _generate(models, mode, steps=8):
    return flux_core.generate("a pear", models, image_size=64, num_inference_steps=steps, seed=11, decode=False,
                              speed_mode=mode)


@pytest.mark.parametrize("mode", presets.SPEED_MODES)
def test_each_preset_is_deterministic_and_reports_its_choices(demo, mode):
    # bf16 (the fp32-compute path on this CPU) for one mode: the runtime choices are the same for the others
    for dtype in (torch.float32, torch.bfloat16) if mode == presets.LIGHTLY_JUICED else (torch.float32,):
        first, second = _generate(demo[dtype], mode), _generate(demo[dtype], mode)
        assert torch.equal(first.latents, second.latents), (mode, dtype)
        assert first.settings["step_cache"] == second.settings["step_cache"]
        acc = first.settings["acceleration"]
        assert acc["attention"] == "sdpa" and acc["compile"] is False and acc["fused_qkv"] is True
        assert acc["precision"] == runtime.plan(mode, "cpu", dtype).precision.name
    for off_mode in ("off", None):  # after a mode, off restores what it can and says so
        off = _generate(demo[torch.float32], off_mode, steps=2)
        assert off.settings["acceleration"]["precision"] == "native"
        assert off.settings["acceleration"]["options"]["compile"] == "off"


def test_off_on_an_untouched_model_reports_no_acceleration(tmp_path):
    paths = demo_model_files(tmp_path)
    models = load_models(paths["transformer"], paths["autoencoder"], paths["t5"], paths["clip"], dtype=torch.float32)
    result = _generate(models, None, steps=2)
    assert "acceleration" not in result.settings and runtime.current(models.transformer) is None
