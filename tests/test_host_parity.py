"""The pack's loaders and sampler inside the real ComfyUI 0.3.75 (in-process, CPU): the MODEL, CLIP and VAE
they give are the host's own classes with exactly the numbers the native loaders give, and a MODEL from the
pack takes native block patches and wrappers during the pack's sampler.

The native transformer loader only takes real widths (ComfyUI hard-codes FLUX.1's 24 heads), so the
transformer checks use a full-width, shallow random model (hidden 3072, 24 heads, 1 double block, no single
blocks, bf16, ~0.8 GB) written once per session. Its weights are fp8-representable, so its fp8 file is a
lossless copy and every layout must give the very same tensors. The native text-encoder loader cannot take
the tiny T5, so the pack's CLIP (the host's modules) is checked against the engine's own text encoders.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import transformer_factory as tf
from comfy_import import comfyui_dir, imported_pack
from flux_core.demo import demo_model_files
from flux_core.model import FluxParams

pytestmark = pytest.mark.host

PACK_MODULE = "flux_juiced_pack_under_test"
WIDE = FluxParams(hidden_size=3072, num_heads=24, depth=1, depth_single_blocks=0, context_in_dim=64, vec_in_dim=64,
                  axes_dim=[16, 56, 56])


@pytest.fixture(scope="module")
def pack(comfy):
    with imported_pack(PACK_MODULE) as module:
        assert len(module.NODE_CLASS_MAPPINGS) >= 6, "the pack's nodes failed to import (see the log)"
        yield SimpleNamespace(nodes=module.NODE_CLASS_MAPPINGS,
                              host_models=sys.modules[f"{PACK_MODULE}.nodes.host_models"])


@pytest.fixture(scope="module")
def demo():
    return demo_model_files()


# ------------------------------------------------------------------------------------------------
# autoencoder


def register(folder: str, *files: Path) -> None:
    """Make the host's folder_paths find these files in one of its model folders (as in models/<folder>/)."""
    import folder_paths

    for file in files:
        folder_paths.add_model_folder_path(folder, str(Path(file).parent), is_default=True)


def test_vae_loader_matches_native_vae_loader(pack, comfy, demo, tmp_path):
    host_nodes = importlib.import_module("nodes")
    assert Path(host_nodes.__file__).resolve().parent == comfyui_dir().resolve()
    (tmp_path / "vae").mkdir()
    os.symlink(demo["autoencoder"], tmp_path / "vae" / "ae.safetensors")
    register("vae", tmp_path / "vae" / "ae.safetensors")
    native = host_nodes.VAELoader().load_vae("ae.safetensors")[0]
    ours = pack.nodes["FluxJuicedVAELoader"]().load("ae.safetensors")[0]
    assert type(ours) is type(native) and type(ours.first_stage_model) is type(native.first_stage_model)
    ours_sd, native_sd = ours.first_stage_model.state_dict(), native.first_stage_model.state_dict()
    assert ours_sd.keys() == native_sd.keys()
    assert all(torch.equal(ours_sd[k], native_sd[k]) for k in native_sd)
    latent = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(0))
    decoded = ours.decode(latent)
    assert decoded.shape == (1, 64, 96, 3)
    assert torch.equal(decoded, native.decode(latent))


# ------------------------------------------------------------------------------------------------
# transformer


@pytest.fixture(scope="module")
def wide_files(tmp_path_factory):
    """The full-width shallow model as a BFL file, a diffusers file and an fp8 file (all the same weights)."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("wide_flux")
    with torch.device("meta"):
        names = FluxTransformer2DModel(**tf.diffusers_config(WIDE)).state_dict()
    gen = torch.Generator().manual_seed(0)
    diffusers_sd = {}
    for name, param in sorted(names.items()):  # fp8-representable, so the fp8 file loses nothing
        diffusers_sd[name] = tf.random_tensor(name, param.shape, gen).to(torch.float8_e4m3fn).to(torch.bfloat16)
    bfl = tf.diffusers_to_bfl(diffusers_sd)
    files = {"bfl": folder / "flux1-dev-wide.safetensors", "diffusers": folder / "wide-diffusers.safetensors",
             "fp8": folder / "wide-fp8_e4m3fn.safetensors"}
    save_file(bfl, str(files["bfl"]))
    save_file(diffusers_sd, str(files["diffusers"]))
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in bfl.items()}, str(files["fp8"]))
    del bfl, diffusers_sd
    yield files
    for path in files.values():  # 2 GB: not worth keeping in pytest's retained temp folders
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def native_wide(comfy, wide_files):
    """ComfyUI's own UNETLoader path on the BFL file."""
    return comfy.sd.load_diffusion_model(str(wide_files["bfl"]))


def apply_model(patcher) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 8, 8, generator=gen)
    context = torch.randn(1, 8, WIDE.context_in_dim, generator=gen)
    y = torch.randn(1, WIDE.vec_in_dim, generator=gen)
    with torch.no_grad():
        return patcher.model.apply_model(x, torch.tensor([0.7]), c_crossattn=context, y=y,
                                         guidance=torch.tensor([3.5]))


def assert_same_weights(ours, native):
    ours_sd, native_sd = ours.model.diffusion_model.state_dict(), native.model.diffusion_model.state_dict()
    assert ours_sd.keys() == native_sd.keys()
    different = [k for k in native_sd if ours_sd[k].dtype != native_sd[k].dtype or not torch.equal(ours_sd[k],
                                                                                                     native_sd[k])]
    assert not different, different[:5]


def test_transformer_loader_matches_native_loader(pack, native_wide, wide_files):
    register("diffusion_models", wide_files["bfl"])
    ours = pack.nodes["FluxJuicedTransformerLoader"]().load(wide_files["bfl"].name, "default")[0]
    assert type(ours.model) is type(native_wide.model)
    assert type(ours.model.diffusion_model) is type(native_wide.model.diffusion_model)
    assert type(ours.model.model_config) is type(native_wide.model.model_config)
    assert ours.model.diffusion_model.num_heads == native_wide.model.diffusion_model.num_heads == 24
    assert ours.model.get_dtype() == native_wide.model.get_dtype()
    assert torch.equal(ours.model.model_sampling.sigmas, native_wide.model.model_sampling.sigmas)
    assert_same_weights(ours, native_wide)
    reference = apply_model(native_wide)
    assert reference.shape == (1, 16, 8, 8) and reference.abs().mean() > 0.1
    assert torch.equal(apply_model(ours), reference)


@pytest.mark.parametrize("layout", ["diffusers", "fp8"])
def test_other_layouts_load_to_the_native_weights(pack, native_wide, wide_files, layout):
    register("diffusion_models", wide_files[layout])
    ours = pack.nodes["FluxJuicedTransformerLoader"]().load(wide_files[layout].name, "default")[0]
    assert_same_weights(ours, native_wide)
    assert torch.equal(apply_model(ours), apply_model(native_wide))


# ------------------------------------------------------------------------------------------------
# text encoders


# (prompt, CLIP chunks): the long one is over CLIP's 77 tokens, which the host encodes in chunks pooling the
# first while the reference truncates; both must give the same vec (and T5 padded to 512 either way).
PROMPTS = [("a juicy orange on a wooden table", 1),
           ("A cinematic photograph of a market stall at dawn: crates of blood oranges, lemons and limes, a "
            "hand-painted sign reading 'FRESH TODAY', steam rising from a coffee cup, soft golden light, shallow "
            "depth of field, 35mm film grain, and a tabby cat asleep on a folded canvas awning beside the scales, "
            "while early shoppers in wool coats pass by in the blurred background.", 2)]


def test_pack_clip_matches_the_engines_text_encoders(pack, comfy, demo, monkeypatch):
    import flux_core

    monkeypatch.setattr(comfy.cli_args.args, "fp32_text_enc", True)  # the host uses fp16 on a CPU otherwise
    pack.host_models._cache.pop("text_encoders", None)
    register("text_encoders", demo["t5"], demo["clip"])
    clip = pack.nodes["FluxJuicedTextEncoderLoader"]().load(demo["t5"].name, demo["clip"].name)[0]
    engine = flux_core.load_text_encoders(demo["t5"], demo["clip"], dtype=torch.float32)
    for prompt, chunks in PROMPTS:
        tokens = clip.tokenize(prompt)
        assert len(tokens["l"]) == chunks and len(tokens["t5xxl"]) == 1
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        txt, vec = engine.encode([prompt])
        assert cond.dtype == torch.float32 and cond.shape == txt.shape == (1, 512, 64)
        assert pooled.shape == vec.shape == (1, 64)
        torch.testing.assert_close(cond, txt, rtol=0, atol=2e-5)
        torch.testing.assert_close(pooled, vec, rtol=0, atol=2e-5)
    pack.host_models._cache.pop("text_encoders", None)  # built in fp32 for this test only


# ------------------------------------------------------------------------------------------------
# native patches on the pack's MODEL


def test_native_block_patch_and_diffusion_model_wrapper_fire_in_the_pack_sampler(pack, comfy, demo):
    import comfy.patcher_extension

    model = pack.host_models.load_model(str(demo["transformer"]), "default")
    sampler = pack.nodes["FluxJuicedSampler"]()
    gen = torch.Generator().manual_seed(1)
    conditioning = [[torch.randn(1, 8, 64, generator=gen), {"pooled_output": torch.randn(1, 64, generator=gen)}]]
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    steps, seed = 3, 7
    calls = {"double_block_0": 0, "diffusion_model": 0}

    def block(args, extra):
        calls["double_block_0"] += 1
        assert {"img", "txt", "vec", "pe"} <= set(args)
        return extra["original_block"](args)

    def wrapper(executor, *args, **kwargs):
        calls["diffusion_model"] += 1
        return executor(*args, **kwargs)

    patched = model.clone()
    patched.set_model_patch_replace(block, "dit", "double_block", 0)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "flux-juiced-test", wrapper)
    out = sampler.sample(patched, conditioning, latent, seed, steps, 3.5)
    result, used = out["result"]
    assert used == seed and out["ui"]["text"] == [f"seed {seed}"]
    assert calls == {"double_block_0": steps, "diffusion_model": steps}
    plain = sampler.sample(model, conditioning, latent, seed, steps, 3.5)["result"][0]
    assert calls == {"double_block_0": steps, "diffusion_model": steps}, "the clone's patches leaked"
    assert torch.equal(result["samples"], plain["samples"])  # pass-through patches change nothing

    def halve(args, extra):
        out = extra["original_block"](args)
        return {"img": out["img"] * 0.5, "txt": out["txt"]}

    changed = model.clone()
    changed.set_model_patch_replace(halve, "dit", "double_block", 0)
    altered = sampler.sample(changed, conditioning, latent, seed, steps, 3.5)["result"][0]
    assert (altered["samples"] - plain["samples"]).abs().max() > 1e-3  # the patch's output is what runs
