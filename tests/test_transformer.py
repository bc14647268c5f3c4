"""The FLUX transformer and its loaders, proven against diffusers and ComfyUI on tiny random weights.

Oracles: diffusers' FluxTransformer2DModel (its own state dict, saved by itself) and ComfyUI 0.3.75's own
comfy.ldm.flux.model.Flux and loader. Every layout must load to the same weights and the same output;
every bad file must raise CheckpointError naming the file, before any weight is read.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

import transformer_factory as tf
from comfy_import import comfy_flux, comfy_forward, host_load_diffusion_model
from flux_core.checkpoints import reader
from flux_core.errors import CheckpointError
from flux_core.loaders import load_transformer
from flux_core.model import Flux

# fp32 parity tolerance on outputs of magnitude ~3 (max |out| ~3.6, std ~1.2). Observed: ~1.5e-6 against
# diffusers and ComfyUI. One swapped q/k chunk, shift/scale pair or head split moves the output by 0.1 to 3
# (test_tolerance_catches_one_swapped_chunk requires > 1000 x TOL).
TOL = 2e-5


def max_diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def assert_same_weights(model, expected: dict):
    got = model.state_dict()
    assert set(got) == set(expected)
    bad = [k for k in expected if not torch.equal(got[k].float(), expected[k].float())]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    """A random diffusers dev model, its output, the same weights in BFL layout, and a folder for files."""
    p = tf.TINY
    model = tf.random_diffusers_model(p, seed=0)
    inputs = tf.make_inputs(p)
    folder = tmp_path_factory.mktemp("transformer")
    bfl = tf.diffusers_to_bfl(model.state_dict())
    bare = tf.write_bfl(bfl, folder / "flux_bfl.safetensors")
    ours = load_transformer(bare, dtype=torch.float32)
    return dataclasses.make_dataclass("Dev", ["p", "model", "inputs", "expected", "bfl", "folder", "bare", "ours"])(
        p, model, inputs, tf.diffusers_forward(model, inputs), bfl, folder, bare, tf.run_flux(ours, inputs))


@pytest.fixture
def reads(monkeypatch):
    """Counts tensor reads from safetensors files (to prove a bad file fails before any data is read)."""
    count = {"n": 0}
    original = reader._Shard.read

    def counting(self, info):
        count["n"] += 1
        return original(self, info)

    monkeypatch.setattr(reader._Shard, "read", counting)
    return count


# ------------------------------------------------------------------------------------------------
# the key layout itself


def test_reference_key_table_matches_model_and_diffusers(dev):
    table = tf.bfl_shapes(dev.p)
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in Flux(dev.p).state_dict().items()}
    assert ours == table
    assert {k: tuple(v.shape) for k, v in dev.bfl.items()} == table
    assert len(table) == 16 + 24 * dev.p.depth + 8 * dev.p.depth_single_blocks + 4  # 780 for the real dev model
    assert len(tf.bfl_shapes(dataclasses.replace(tf.TINY, depth=19, depth_single_blocks=38))) == 780


# ------------------------------------------------------------------------------------------------
# numerical parity with independent implementations


@pytest.mark.parametrize("variant", ["dev", "schnell", "fill"])
def test_parity_with_diffusers(dev, tmp_path, variant):
    if variant == "dev":
        p, model, inputs, expected = dev.p, dev.model, dev.inputs, dev.expected
    else:
        p = tf.tiny_params(guidance_embed=False) if variant == "schnell" else tf.tiny_params(in_channels=384)
        model = tf.random_diffusers_model(p, seed=7)
        inputs = tf.make_inputs(p, guidance=None if variant == "schnell" else 3.5)
        expected = tf.diffusers_forward(model, inputs)
    ours = load_transformer(tf.write_diffusers_single(model, tmp_path / "diffusers.safetensors"), dtype=torch.float32)
    assert ours.params == p
    got = tf.run_flux(ours, inputs)
    diff = max_diff(got, expected)
    print(f"\n[{variant}] max |ours - diffusers| = {diff:.3g} (max |out| {expected.abs().max():.3g})")
    assert diff < TOL
    assert expected.abs().max() > 1.0 and expected.std() > 0.3  # an output that can show a mistake


def _swap_rows(t, a: slice, b: slice):
    t = t.clone()
    t[a], t[b] = t[b].clone(), t[a].clone()
    return t


def _corruptions(p):
    h, hd = p.hidden_size, p.hidden_size // p.num_heads
    q, k = slice(0, h), slice(h, 2 * h)

    def swap_qk(sd, stem):
        return {**sd, **{f"{stem}.{x}": _swap_rows(sd[f"{stem}.{x}"], q, k) for x in ("weight", "bias")}}

    def swap_halves(sd, key, n, i, j):
        chunks = list(sd[key].chunk(n))
        chunks[i], chunks[j] = chunks[j], chunks[i]
        return {**sd, key: torch.cat(chunks)}

    def head_major(sd, key):  # read the fused qkv as (head, q/k/v, dim) instead of (q/k/v, head, dim)
        w = sd[key]
        qkv = w[: 3 * h].reshape(3, p.num_heads, hd, -1).transpose(0, 1).reshape(3 * h, -1)
        return {**sd, key: torch.cat([qkv, w[3 * h:]])}

    return {
        "q<->k in double block 1 img_attn": lambda sd: swap_qk(sd, "double_blocks.1.img_attn.qkv"),
        "q<->k in single block 0": lambda sd: swap_qk(sd, "single_blocks.0.linear1"),
        "shift<->scale in final layer": lambda sd: swap_halves(sd, "final_layer.adaLN_modulation.1.weight", 2, 0, 1),
        "shift<->scale in double block 0 txt_mod": lambda sd: swap_halves(sd, "double_blocks.0.txt_mod.lin.weight",
                                                                           6, 0, 1),
        "head split in single block 1": lambda sd: head_major(sd, "single_blocks.1.linear1.weight"),
    }


@pytest.mark.parametrize("corruption", list(_corruptions(tf.TINY)))
def test_tolerance_catches_one_swapped_chunk(dev, tmp_path, corruption):
    """A loader that got one chunk wrong would fail the parity tests above by orders of magnitude."""
    bad = _corruptions(dev.p)[corruption](dev.bfl)
    model = load_transformer(tf.write_bfl(bad, tmp_path / "bad.safetensors"), dtype=torch.float32)
    diff = max_diff(tf.run_flux(model, dev.inputs), dev.expected)
    print(f"\n[{corruption}] max |corrupted - diffusers| = {diff:.3g} = {diff / TOL:.0f} x TOL")
    assert diff > 1000 * TOL


def test_parity_with_comfyui(dev, comfy):
    """ComfyUI's own Flux, strictly loaded with the same BFL weights, on packed tokens and ids."""
    host = comfy_flux(dev.p, comfy)
    host.load_state_dict(dev.bfl, strict=True)
    got = comfy_forward(host, dev.inputs)
    diff = max_diff(dev.ours, got)
    print(f"\nmax |ours - ComfyUI| = {diff:.3g}; |ComfyUI - diffusers| = {max_diff(got, dev.expected):.3g}")
    assert diff < TOL
    # the test's own diffusers->BFL conversion is right by two independent oracles, not by flux_core
    assert max_diff(got, dev.expected) < TOL


def test_dev_model_refuses_missing_guidance(dev):
    with pytest.raises(ValueError, match="guidance"):
        tf.run_flux(load_transformer(dev.bare, dtype=torch.float32), {**dev.inputs, "guidance": None})


# ------------------------------------------------------------------------------------------------
# every layout loads to the same weights and output


def _layout(name, dev, folder):
    if name == "bfl":
        return dev.bare
    if name == "comfyui_prefixed":
        return tf.write_bfl(dev.bfl, folder / "prefixed.safetensors", prefix="model.diffusion_model.")
    if name == "comfyui_all_in_one":
        return tf.write_comfy_all_in_one(dev.bfl, folder / "all_in_one.safetensors")
    if name == "diffusers_file":
        return tf.write_diffusers_single(dev.model, folder / "diffusers.safetensors")
    if name == "diffusers_folder":
        dev.model.save_pretrained(str(folder / "single"), safe_serialization=True)
        return folder / "single"
    if name == "diffusers_sharded":
        return tf.write_diffusers_sharded(dev.model, folder / "sharded")
    if name == "diffusers_sharded_index":
        return tf.write_diffusers_sharded(dev.model, folder / "sharded") / "diffusion_pytorch_model.safetensors.index.json"
    raise ValueError(name)


LOSSLESS = ["bfl", "comfyui_prefixed", "comfyui_all_in_one", "diffusers_file", "diffusers_folder",
            "diffusers_sharded", "diffusers_sharded_index"]


@pytest.mark.parametrize("layout", LOSSLESS)
def test_lossless_layouts_load_identically(dev, tmp_path, layout):
    model = load_transformer(_layout(layout, dev, tmp_path), dtype=torch.float32)
    assert model.params == dev.p
    assert_same_weights(model, dev.bfl)
    assert torch.equal(tf.run_flux(model, dev.inputs), dev.ours)


def _fp8_file(name, sd, folder):
    """(path, reference fp32 weights) for one fp8 flavour."""
    path = folder / f"{name}.safetensors"
    if name in ("fp8_e4m3fn", "fp8_e5m2", "fp8_e4m3fn_all_in_one"):
        stored, ref = tf.fp8_state_dict(sd, torch.float8_e5m2 if "e5m2" in name else torch.float8_e4m3fn)
        if name.endswith("all_in_one"):
            return tf.write_comfy_all_in_one(stored, path), ref
        return tf.write_bfl(stored, path), ref
    flavour = "mixed" if name.startswith("mixed") else "legacy"
    stored, ref, metadata = tf.scaled_fp8_state_dict(sd, flavour, fp8_biases=name.endswith("fp8_biases"))
    prefix = "model.diffusion_model." if name.endswith("prefixed") else ""
    return tf.write_bfl(stored, path, prefix=prefix, metadata=metadata), ref


FP8 = ["fp8_e4m3fn", "fp8_e5m2", "fp8_e4m3fn_all_in_one", "scaled_fp8", "scaled_fp8_prefixed",
       "scaled_fp8_fp8_biases", "mixed_fp8"]


@pytest.mark.parametrize("layout", FP8)
def test_fp8_layouts_dequantize_exactly(dev, tmp_path, layout):
    path, ref = _fp8_file(layout, dev.bfl, tmp_path)
    model = load_transformer(path, dtype=torch.float32)
    assert model.params == dev.p
    assert_same_weights(model, ref)
    expected = tf.run_flux(tf.flux_from_state_dict(ref), dev.inputs)
    got = tf.run_flux(model, dev.inputs)
    assert torch.equal(got, expected)
    # the round trip really changed the weights, so this test tells dequantization apart from a plain copy
    assert max_diff(got, dev.ours) > 100 * TOL


@pytest.mark.parametrize("layout", ["fp8_e4m3fn", "scaled_fp8_fp8_biases", "mixed_fp8", "comfyui_all_in_one"])
def test_host_loader_reads_our_files_the_same_way(dev, comfy, tmp_path, layout):
    """ComfyUI's own loader (detection, scaled_fp8 / mixed-precision ops) on the same files gives our output,
    so the writers above produce what the host reads, not merely what our reader expects."""
    if layout == "comfyui_all_in_one":
        path = _layout(layout, dev, tmp_path)
    else:
        path, _ = _fp8_file(layout, dev.bfl, tmp_path)
    host = host_load_diffusion_model(comfy, path)
    if layout in ("scaled_fp8_fp8_biases", "mixed_fp8"):  # the host kept fp8 weights: its quantized path
        assert host.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    ours = load_transformer(path, dtype=torch.float32)
    diff = max_diff(tf.run_flux(ours, dev.inputs), comfy_forward(host, dev.inputs))
    print(f"\n[{layout}] max |ours - ComfyUI loader| = {diff:.3g}")
    assert diff < TOL


# ------------------------------------------------------------------------------------------------
# configuration from shapes


VARIANTS = {
    "dev": {},
    "schnell": dict(guidance_embed=False),
    "canny_depth": dict(in_channels=128),
    "fill": dict(in_channels=384),
    "schnell_fill": dict(guidance_embed=False, in_channels=384),
    "depth_3_1": dict(depth=3, depth_single_blocks=1),
    "depth_1_3": dict(depth=1, depth_single_blocks=3),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_inferred_from_shapes(tmp_path, variant):
    p = tf.tiny_params(**VARIANTS[variant])
    sd = tf.random_bfl_state_dict(p, seed=11)
    model = load_transformer(tf.write_bfl(sd, tmp_path / "v.safetensors"), dtype=torch.float32)
    assert model.params == p
    assert model.params.variant == {"dev": "dev", "schnell": "schnell", "canny_depth": "dev-canny/depth",
                                    "fill": "dev-fill", "schnell_fill": "schnell-fill"}.get(variant, "dev")
    assert (model.guidance_in is None) == (not p.guidance_embed)
    assert (len(model.double_blocks), len(model.single_blocks)) == (p.depth, p.depth_single_blocks)
    assert_same_weights(model, sd)
    inputs = tf.make_inputs(p, guidance=3.5 if p.guidance_embed else None)
    out = tf.run_flux(model, inputs)
    assert out.shape == (2, 15, 64) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------
# bad input: CheckpointError naming the file and what was found / expected, before any weight is read


def _bad_file(case, dev, folder):
    """(path to load, path the message must name, fragments the message must contain)."""
    good = dev.bare
    if case == "missing_file":
        path = folder / "nope.safetensors"
        return path, path, ["does not exist"]
    if case == "truncated":
        path = folder / "truncated.safetensors"
        data = good.read_bytes()
        path.write_bytes(data[: len(data) - 1000])
        return path, path, ["truncated", f"{len(data) - 1000} bytes"]
    if case == "corrupt_header_json":
        path = folder / "corrupt.safetensors"
        data = bytearray(good.read_bytes())
        data[8:40] = b"#" * 32
        path.write_bytes(bytes(data))
        return path, path, ["header", "JSON"]
    if case == "corrupt_header_length":
        path = folder / "corrupt_len.safetensors"
        data = bytearray(good.read_bytes())
        data[:8] = (10**12).to_bytes(8, "little")
        path.write_bytes(bytes(data))
        return path, path, ["header", "corrupt"]
    if case in ("pickle_ckpt", "pickle_pt"):
        path = folder / ("model.ckpt" if case == "pickle_ckpt" else "model.pt")
        torch.save({"img_in.weight": torch.zeros(2, 2)}, path)
        return path, path, ["pickle", "safetensors"]
    if case == "pickle_named_safetensors":
        path = folder / "pickle.safetensors"
        torch.save({"img_in.weight": torch.zeros(2, 2)}, path)
        return path, path, ["header"]
    if case == "sdxl":
        path = folder / "sdxl.safetensors"
        save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
                   "model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3),
                   "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(8)},
                  str(path))
        return path, path, ["not a FLUX transformer", "SDXL", "model.diffusion_model.input_blocks.0.0.weight"]
    if case == "wrong_shape":
        sd = dict(dev.bfl)
        sd["single_blocks.1.linear2.weight"] = torch.zeros(256, 1279)
        path = tf.write_bfl(sd, folder / "wrong_shape.safetensors")
        return path, path, ["single_blocks.1.linear2.weight", "[256, 1279]", "[256, 1280]"]
    if case == "missing_block_tensor":
        sd = {k: v for k, v in dev.bfl.items() if k != "double_blocks.1.txt_mlp.2.bias"}
        path = tf.write_bfl(sd, folder / "missing.safetensors")
        return path, path, ["double_blocks.1.txt_mlp.2.bias", "incomplete"]
    if case == "diffusers_missing_tensor":
        sd = {k: v for k, v in dev.model.state_dict().items() if k != "transformer_blocks.1.attn.to_k.weight"}
        path = folder / "diffusers_missing.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        return path, path, ["double_blocks.1.img_attn.qkv.weight", "incomplete"]
    if case == "sharded_index_missing_shard":
        shards = tf.write_diffusers_sharded(dev.model, folder / "sharded")
        index = json.loads((shards / "diffusion_pytorch_model.safetensors.index.json").read_text())
        gone = sorted(set(index["weight_map"].values()))[1]
        (shards / gone).unlink()
        return shards, shards / gone, ["shard", "missing", "diffusion_pytorch_model.safetensors.index.json"]
    if case == "empty_folder":
        path = folder / "empty"
        path.mkdir()
        return path, path, ["no single checkpoint"]
    raise ValueError(case)


BAD = ["missing_file", "truncated", "corrupt_header_json", "corrupt_header_length", "pickle_ckpt", "pickle_pt",
       "pickle_named_safetensors", "sdxl", "wrong_shape", "missing_block_tensor", "diffusers_missing_tensor",
       "sharded_index_missing_shard", "empty_folder"]


@pytest.mark.parametrize("case", BAD)
def test_bad_files_raise_checkpoint_error_before_reading(dev, tmp_path, reads, case):
    path, named, fragments = _bad_file(case, dev, tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_transformer(path, dtype=torch.float32)
    message = str(err.value)
    assert str(named) in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert reads["n"] == 0, f"{reads['n']} tensors were read before the error"
    assert isinstance(err.value, ValueError)  # callers catching ValueError still catch it


def test_read_counter_counts(dev, reads):
    """The counter used above does see reads: a good load reads every tensor once."""
    load_transformer(dev.bare, dtype=torch.float32)
    assert reads["n"] == len(dev.bfl)


# ------------------------------------------------------------------------------------------------
# dtypes


def test_bf16_file_loads_as_bf16_and_as_fp32(dev, tmp_path):
    bf16 = {k: v.to(torch.bfloat16) for k, v in dev.bfl.items()}
    path = tf.write_bfl(bf16, tmp_path / "bf16.safetensors")

    as_bf16 = load_transformer(path)  # the default dtype is bf16
    assert {t.dtype for t in as_bf16.state_dict().values()} == {torch.bfloat16}
    assert_same_weights(as_bf16, bf16)
    as_fp32 = load_transformer(path, dtype=torch.float32)
    assert {t.dtype for t in as_fp32.state_dict().values()} == {torch.float32}
    assert_same_weights(as_fp32, {k: v.float() for k, v in bf16.items()})

    # Same bf16-representable inputs. The reference takes t and guidance in the model dtype and scales them
    # by 1000 in that dtype (0.7 -> 700 and 3.5 -> 3504 in bf16), so pick values that stay exact: 500, 4000.
    inputs16 = tf.make_inputs(dev.p, t=0.5, guidance=4.0, dtype=torch.bfloat16)
    out16 = tf.run_flux(as_bf16, inputs16)
    out32 = tf.run_flux(as_fp32, {k: (v.float() if v is not None else v) for k, v in inputs16.items()})
    assert out16.dtype == torch.bfloat16
    rel = max_diff(out16, out32) / out32.abs().max().item()
    print(f"\nbf16 vs fp32 compute on the same bf16 weights: max diff / max |out| = {rel:.3g}")
    assert rel < 0.03  # bf16 arithmetic (observed ~0.008), not garbage


def test_fp32_file_loads_as_bf16(dev):
    model = load_transformer(dev.bare, dtype=torch.bfloat16)
    assert {t.dtype for t in model.state_dict().values()} == {torch.bfloat16}
    assert_same_weights(model, {k: v.to(torch.bfloat16) for k, v in dev.bfl.items()})
