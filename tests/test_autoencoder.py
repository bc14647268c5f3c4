"""The autoencoder: architecture, parity with diffusers, every checkpoint layout, and bad input."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from flux_core.autoencoder import FLUX_AE, TINY_AE, AutoEncoder
from flux_core.checkpoints.autoencoder import infer_autoencoder_params, load_autoencoder
from flux_core.errors import CheckpointError
from vae_factory import (contiguous, linear_attention, old_attention_names, random_diffusers_vae,
                         write_diffusers_root)

SCALE, SHIFT = TINY_AE.scale_factor, TINY_AE.shift_factor
# Non-square on purpose: a height/width mix-up in the attention reshape must show.
H, W = 48, 64


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1.0)).item()


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """A random diffusers VAE written as a pipeline folder, our model loaded from it, and test inputs."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("vae") / "flux-pipeline"
    dvae = random_diffusers_vae(TINY_AE, seed=1)
    write_diffusers_root(dvae, root)
    ours = load_autoencoder(root / "vae")
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, H, W, generator=gen) * 2 - 1
    z = torch.randn(2, 16, H // 8, W // 8, generator=gen)
    with torch.no_grad():
        latent = ours.encode(x)
        image = ours.decode(z)
    return dict(root=root, dvae=dvae, ours=ours, x=x, z=z, latent=latent, image=image,
                bfl=contiguous(ours.state_dict()), tmp=root.parent)


# ----------------------------------------------------------------------------------------------------
# Architecture


def test_full_size_matches_reference_file():
    with torch.device("meta"):
        model = AutoEncoder(FLUX_AE)
    sd = model.state_dict()
    assert len(sd) == 244
    assert sum(t.numel() for t in sd.values()) == 83_819_683
    for name in ("encoder.down.0.block.0.norm1.weight", "decoder.up.3.upsample.conv.weight",
                 "encoder.mid.attn_1.q.weight", "encoder.down.2.block.0.nin_shortcut.weight",
                 "encoder.down.2.downsample.conv.weight", "decoder.up.0.block.2.conv2.weight",
                 "decoder.norm_out.bias", "encoder.conv_out.weight"):
        assert name in sd, name
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.3.downsample.conv.weight" not in sd
    assert tuple(sd["encoder.conv_out.weight"].shape) == (32, 512, 3, 3)
    assert tuple(sd["encoder.mid.attn_1.q.weight"].shape) == (512, 512, 1, 1)


def test_tiny_shapes_and_dtype_follow_weights():
    model = AutoEncoder(TINY_AE).to(torch.bfloat16)
    with torch.no_grad():
        latent = model.encode(torch.zeros(1, 3, 32, 40))
        image = model.decode(latent.float())
    assert TINY_AE.downscale == 8
    assert latent.shape == (1, 16, 4, 5) and latent.dtype == torch.bfloat16
    assert image.shape == (1, 3, 32, 40)


def test_attention_feeds_sdpa_contiguous_inputs(monkeypatch):
    # Strided inputs send CPU SDPA to its math path, which holds the whole (H*W)^2 score matrix.
    import torch.nn.functional as F

    seen, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append(all(t.is_contiguous() for t in (q, k, v)))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        AutoEncoder(TINY_AE).decode(torch.zeros(1, 16, 3, 5))
    assert seen == [True]


def test_in_place_inference_path_matches_autograd_path():
    model = AutoEncoder(TINY_AE).eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        fast = model(x)
    assert torch.equal(fast, model(x).detach())


# ----------------------------------------------------------------------------------------------------
# Parity with diffusers on the same weights


def test_encode_matches_diffusers(ref):
    with torch.no_grad():
        expected = (ref["dvae"].encode(ref["x"]).latent_dist.mean - SHIFT) * SCALE
    err = rel_err(ref["latent"], expected)
    print(f"encode max rel diff vs diffusers: {err:.2e}")
    assert err < 1e-4


def test_decode_matches_diffusers(ref):
    with torch.no_grad():
        expected = ref["dvae"].decode(ref["z"] / SCALE + SHIFT).sample
    err = rel_err(ref["image"], expected)
    print(f"decode max rel diff vs diffusers: {err:.2e}")
    assert err < 1e-4


def _swap(sd, a, b):
    sd = dict(sd)
    for suffix in [k[len(a):] for k in sd if k.startswith(a)]:
        sd[a + suffix], sd[b + suffix] = sd[b + suffix], sd[a + suffix]
    return sd


@pytest.mark.parametrize("a, b", [
    ("decoder.up.0.block.0.", "decoder.up.0.block.1."),      # blocks within a level
    ("decoder.up.3.block.", "decoder.up.2.block."),          # the reversed up index
    ("decoder.up.0.block.0.norm1.", "decoder.up.0.block.0.norm2."),  # GroupNorm affines
])
def test_tolerance_catches_a_swap(ref, a, b):
    model = AutoEncoder(TINY_AE).eval()
    model.load_state_dict(_swap(ref["bfl"], a, b))
    with torch.no_grad():
        err = rel_err(model.decode(ref["z"]), ref["image"])
    print(f"swap {a} <-> {b}: {err:.2e}")
    assert err > 1e-2


# ----------------------------------------------------------------------------------------------------
# Every layout loads to the same numbers


def _write(ref, name, tensors):
    path = ref["tmp"] / name
    if not path.exists():
        save_file(tensors, str(path))
    return path


LAYOUTS = {
    "bfl": lambda r: _write(r, "ae.safetensors", r["bfl"]),
    "comfy_all_in_one": lambda r: _write(r, "flux_aio.safetensors", {
        **contiguous(r["bfl"], prefix="vae."),
        "model.diffusion_model.x": torch.zeros(2),
        "model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2),
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)}),
    "first_stage_model": lambda r: _write(r, "sd_style.safetensors", contiguous(r["bfl"], prefix="first_stage_model.")),
    "bfl_linear_attention": lambda r: _write(r, "ae_linear.safetensors", linear_attention(r["bfl"])),
    "diffusers_file": lambda r: _write(r, "vae_diffusers.safetensors", contiguous(r["dvae"].state_dict())),
    "diffusers_old_attention": lambda r: _write(r, "vae_old.safetensors",
                                                old_attention_names(contiguous(r["dvae"].state_dict()))),
    "diffusers_prefixed": lambda r: _write(r, "pipe_aio.safetensors", contiguous(r["dvae"].state_dict(), prefix="vae.")),
    "diffusers_folder": lambda r: r["root"] / "vae",
    "diffusers_root": lambda r: r["root"],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_loads_identical_weights(ref, layout):
    model = load_autoencoder(LAYOUTS[layout](ref))
    assert model.params.ch == TINY_AE.ch and model.params.ch_mult == TINY_AE.ch_mult
    assert model.params.num_res_blocks == TINY_AE.num_res_blocks and model.params.z_channels == 16
    assert (model.scale_factor, model.shift_factor) == (SCALE, SHIFT)
    got = model.state_dict()
    assert got.keys() == ref["bfl"].keys()
    assert all(torch.equal(got[k], ref["bfl"][k]) for k in got)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_file_loads_close(ref, dtype, tol):
    name = f"ae_{str(dtype).split('.')[-1]}.safetensors"
    model = load_autoencoder(_write(ref, name, contiguous(ref["bfl"], dtype=dtype)))
    assert next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        err = rel_err(model.decode(ref["z"]), ref["image"])
    print(f"{dtype} file, decode max rel diff: {err:.2e}")
    assert err < tol


def test_public_entry_point(ref):
    import flux_core

    model = flux_core.load_autoencoder(LAYOUTS["bfl"](ref), device="cpu")
    assert isinstance(model, AutoEncoder) and not model.training
    assert torch.equal(model.state_dict()["decoder.conv_in.weight"], ref["bfl"]["decoder.conv_in.weight"])


def test_load_casts_to_requested_dtype(ref):
    model = load_autoencoder(LAYOUTS["bfl"](ref), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert rel_err(model.decode(ref["z"]), ref["image"]) < 5e-2


def test_diffusers_config_scaling_is_used(ref):
    folder = ref["tmp"] / "sd3_style_vae"
    if not folder.exists():
        shutil.copytree(ref["root"] / "vae", folder)
        config = json.loads((folder / "config.json").read_text())
        config.update(scaling_factor=1.5305, shift_factor=0.0609)
        (folder / "config.json").write_text(json.dumps(config))
    model = load_autoencoder(folder)
    assert (model.scale_factor, model.shift_factor) == (1.5305, 0.0609)


def test_infer_params_reads_shapes(ref):
    from flux_core.checkpoints.autoencoder import autoencoder_sources
    from flux_core.checkpoints.reader import open_checkpoint

    with open_checkpoint(LAYOUTS["diffusers_file"](ref)) as tf:
        params = infer_autoencoder_params(autoencoder_sources(tf), tf.path)
    assert (params.ch, params.ch_mult, params.num_res_blocks, params.z_channels) == (32, [1, 1, 2, 2], 1, 16)
    assert (params.in_channels, params.out_ch) == (3, 3)


# ----------------------------------------------------------------------------------------------------
# Bad input: one CheckpointError naming the file, what was found and what was expected


def _raises(path, *fragments):
    with pytest.raises(CheckpointError) as info:
        load_autoencoder(path)
    message = str(info.value)
    assert path.name in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_file(tmp_path):
    _raises(tmp_path / "no_such_ae.safetensors", "does not exist")


def test_truncated_file(ref, tmp_path):
    data = LAYOUTS["bfl"](ref).read_bytes()
    cut = tmp_path / "cut_ae.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    _raises(cut, "truncated")


def test_sdxl_unet_given_as_vae(tmp_path):
    path = tmp_path / "sdxl_base.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "model.diffusion_model.input_blocks.0.0.bias": torch.zeros(4)}, str(path))
    _raises(path, "not a FLUX autoencoder", "Stable Diffusion", "expected")


def test_transformer_given_as_vae(tmp_path):
    path = tmp_path / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2), "img_in.weight": torch.zeros(2, 4)},
              str(path))
    _raises(path, "not a FLUX autoencoder", "FLUX transformer")


def test_sd_autoencoder_with_quant_convs_is_refused(ref, tmp_path):
    path = tmp_path / "sdxl_vae.safetensors"
    save_file({**ref["bfl"], "quant_conv.weight": torch.zeros(8, 8, 1, 1),
               "post_quant_conv.weight": torch.zeros(4, 4, 1, 1)}, str(path))
    _raises(path, "quant_conv", "16 latent channels")


def test_shape_mismatch(ref, tmp_path):
    path = tmp_path / "odd_ae.safetensors"
    save_file({**ref["bfl"], "decoder.mid.block_1.conv1.weight": torch.zeros(64, 64, 1, 1)}, str(path))
    _raises(path, "decoder.mid.block_1.conv1.weight", "[64, 64, 3, 3]")


def test_inconsistent_latent_channels(ref, tmp_path):
    path = tmp_path / "z8_ae.safetensors"
    save_file({**ref["bfl"], "encoder.conv_out.weight": torch.zeros(16, 64, 3, 3),
               "encoder.conv_out.bias": torch.zeros(16)}, str(path))
    _raises(path, "encoder.conv_out.weight")


def test_missing_tensor(ref, tmp_path):
    path = tmp_path / "partial_ae.safetensors"
    save_file({k: v for k, v in ref["bfl"].items() if k != "decoder.up.1.upsample.conv.bias"}, str(path))
    _raises(path, "incomplete", "decoder.up.1.upsample.conv.bias")


def test_decoder_only_file(ref, tmp_path):
    path = tmp_path / "decoder_only.safetensors"
    save_file({k: v for k, v in ref["bfl"].items() if k.startswith("decoder.")}, str(path))
    _raises(path, "incomplete", "encoder.conv_in.weight")


def test_extra_tensor(ref, tmp_path):
    path = tmp_path / "extra_ae.safetensors"
    save_file({**ref["bfl"], "encoder.down.0.block.7.conv1.weight": torch.zeros(32, 32, 3, 3)}, str(path))
    _raises(path, "encoder.down.0.block.7.conv1.weight")


def test_pipeline_root_without_vae(tmp_path):
    root = tmp_path / "pipeline_without_vae"
    root.mkdir()
    (root / "model_index.json").write_text("{}")
    _raises(root, "no vae/ subfolder")
