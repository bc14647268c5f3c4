"""LoRAs in the engine: every file layout maps to the reference layers, the per-call low-rank terms compute
what merging the weights by hand computes, ComfyUI's own LoRA path gives the same numbers on the same files,
they reach packed and fp8 layers, come off exactly, and generate() / the CLI take and record them.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import lora_factory as lf
import transformer_factory as tf
from comfy_import import comfy_forward, host_load_patcher
from flux_core import lora
from flux_core.loaders import load_transformer


@pytest.fixture(scope="module")
def changes(tmp_path_factory):
    """A folder with a tiny BFL transformer, the two standard LoRA files and the weights with both merged by
    hand; returns the files' changes (lora_factory.write_standard_loras), the folder as `.folder`."""
    folder = tmp_path_factory.mktemp("lora")
    weights = tf.random_bfl_state_dict(tf.TINY, seed=5)
    written = lf.write_standard_loras(folder)
    tf.write_bfl(weights, folder / "flux-tiny.safetensors")
    tf.write_bfl(lf.merge(weights, written), folder / "flux-tiny-merged.safetensors")
    return Changes(written, folder=folder)


class Changes(dict):
    def __init__(self, changes, folder):
        super().__init__(changes)
        self.folder = folder


@pytest.fixture(scope="module")
def files(changes):
    return changes.folder


def standard(folder) -> list[tuple[str, float]]:
    return [(str(folder / name), strength) for name, strength in lf.STRENGTHS.items()]


def test_per_call_loras_compute_the_merged_weights_and_come_off_exactly(files):
    model = load_transformer(files / "flux-tiny.safetensors", dtype=torch.float32)
    inputs = tf.make_inputs(tf.TINY)
    plain = tf.run_flux(model, inputs)
    summary = lora.use_loras(model, standard(files))
    assert summary == [{"name": lf.KOHYA, "strength": 0.8, "layers": 4},
                       {"name": lf.DIFFUSERS, "strength": 1.0, "layers": 3}]
    got = tf.run_flux(model, inputs)
    want = tf.run_flux(load_transformer(files / "flux-tiny-merged.safetensors", dtype=torch.float32), inputs)
    assert tf.rel_l2(got, want) < 1e-5
    assert tf.rel_l2(plain, want) > 0.05, "the LoRAs changed nothing"
    assert not any("flux_lora" in k for k in model.state_dict())

    lora.use_loras(model, [])
    assert lora.applied_loras(model) == []
    assert torch.equal(tf.run_flux(model, inputs), plain)


@pytest.mark.host
def test_same_numbers_as_comfyui_lora_loading_on_the_same_files(files, comfy):
    """ComfyUI's own LoRA path (key mapping, the diffusers q/k/v offsets, alpha, strengths, merged into its
    weights) on its own FLUX model, against the engine's per-call LoRAs."""
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    patcher = host_load_patcher(comfy, files / "flux-tiny.safetensors", {"dtype": torch.float32})
    for name, strength in lf.STRENGTHS.items():
        patcher, _ = comfy.sd.load_lora_for_models(patcher, None, comfy.utils.load_torch_file(str(files / name)),
                                                   strength, 0)
    comfy.model_management.load_models_gpu([patcher])
    inputs = tf.make_inputs(tf.TINY)
    host = comfy_forward(patcher.model.diffusion_model, inputs)
    comfy.model_management.unload_all_models()

    model = load_transformer(files / "flux-tiny.safetensors", dtype=torch.float32)
    lora.use_loras(model, standard(files))
    ours = tf.run_flux(model, inputs)
    assert host.abs().mean() > 0.1
    assert tf.rel_l2(ours, host) < 1e-5


def test_every_key_layout_names_the_same_update(files, tmp_path):
    """One update of single_blocks.0.linear1's q rows, written as each trainer writes it, and one of the final
    modulation whose halves diffusers keeps swapped."""
    model = load_transformer(files / "flux-tiny.safetensors", dtype=torch.float32)
    gen = torch.Generator().manual_seed(2)
    up, down = lf.low_rank(lf.H, lf.H, gen)
    alpha = torch.tensor(2.0)
    spellings = {
        "diffusers": {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": down,
                      "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": up,
                      "transformer.single_transformer_blocks.0.attn.to_q.alpha": alpha},
        "peft": {"base_model.model.single_transformer_blocks.0.attn.to_q.lora_A.default.weight": down,
                 "base_model.model.single_transformer_blocks.0.attn.to_q.lora_B.default.weight": up,
                 "base_model.model.single_transformer_blocks.0.attn.to_q.alpha": alpha},
        "onetrainer": {"lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight": down,
                       "lora_transformer_single_transformer_blocks_0_attn_to_q.lora_up.weight": up,
                       "lora_transformer_single_transformer_blocks_0_attn_to_q.alpha": alpha},
    }
    for name, tensors in spellings.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        (layer,) = lora.read_lora(tmp_path / f"{name}.safetensors", model).layers
        assert (layer.target, layer.rows, layer.scale) == ("single_blocks.0.linear1", (0, lf.H), 0.5), name
        assert torch.equal(layer.up, up) and torch.equal(layer.down, down)

    # Reference names, bare or prefixed, with lora_A/lora_B or lora_down/lora_up: the whole fused layer.
    full_up, full_down = lf.low_rank(3 * lf.H, lf.H, gen)
    for key in ("double_blocks.1.txt_attn.qkv", "diffusion_model.double_blocks.1.txt_attn.qkv",
                "model.diffusion_model.double_blocks.1.txt_attn.qkv"):
        save_file({key + ".lora_A.weight": full_down, key + ".lora_B.weight": full_up}, str(tmp_path / "ref.safetensors"))
        (layer,) = lora.read_lora(tmp_path / "ref.safetensors", model).layers
        assert (layer.target, layer.rows, layer.scale) == ("double_blocks.1.txt_attn.qkv", None, 1.0), key

    # diffusers' norm_out.linear is (scale, shift); the reference's final modulation is (shift, scale).
    mod_up, mod_down = lf.low_rank(2 * lf.H, lf.H, gen)
    save_file({"transformer.norm_out.linear.lora_A.weight": mod_down,
               "transformer.norm_out.linear.lora_B.weight": mod_up}, str(tmp_path / "norm_out.safetensors"))
    (layer,) = lora.read_lora(tmp_path / "norm_out.safetensors", model).layers
    assert layer.target == "final_layer.adaLN_modulation.1"
    assert torch.equal(layer.up, torch.cat([mod_up[lf.H:], mod_up[:lf.H]]))


def test_files_that_do_not_fit_are_refused_by_name(files, tmp_path, caplog):
    model = load_transformer(files / "flux-tiny.safetensors", dtype=torch.float32)
    gen = torch.Generator().manual_seed(4)
    up, down = lf.low_rank(3 * lf.H, lf.H, gen)
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"

    def write(name, tensors):
        save_file({k: v.clone() for k, v in tensors.items()}, str(tmp_path / name))
        return tmp_path / name

    with pytest.raises(lora.LoraError, match="no such LoRA file"):
        lora.read_lora(tmp_path / "missing.safetensors", model)
    (tmp_path / "old.pt").write_bytes(b"\x80\x04")
    with pytest.raises(lora.LoraError, match="safetensors files only"):
        lora.read_lora(tmp_path / "old.pt", model)
    big = write("big.safetensors", {qkv + ".lora_down.weight": torch.zeros(4, 2 * lf.H),
                                    qkv + ".lora_up.weight": torch.zeros(3 * lf.H, 4)})
    with pytest.raises(lora.LoraError, match="made for another model"):
        lora.read_lora(big, model)
    dora = write("dora.safetensors", {qkv + ".lora_down.weight": down, qkv + ".lora_up.weight": up,
                                      qkv + ".dora_scale": torch.ones(3 * lf.H, 1)})
    with pytest.raises(lora.LoraError, match="DoRA"):
        lora.read_lora(dora, model)
    te_only = write("te.safetensors", {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": down,
                                       "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": up})
    with pytest.raises(lora.LoraError, match="only text-encoder layers"):
        lora.read_lora(te_only, model)
    other = write("other.safetensors", {"lora_unet_down_blocks_0_attn.lora_down.weight": down,
                                        "lora_unet_down_blocks_0_attn.lora_up.weight": up})
    with pytest.raises(lora.LoraError, match="no layer of this FLUX transformer"):
        lora.read_lora(other, model)

    # A file with some layers this model has and some it lacks: the known ones apply, the rest is named.
    mixed = write("mixed.safetensors", {qkv + ".lora_down.weight": down, qkv + ".lora_up.weight": up,
                                        "lora_unet_down_blocks_0_attn.lora_down.weight": down,
                                        "lora_unet_down_blocks_0_attn.lora_up.weight": up,
                                        "lora_te1_x.lora_down.weight": down, "lora_te1_x.lora_up.weight": up})
    with caplog.at_level(logging.WARNING, logger="flux_core.lora"):
        summary = lora.use_loras(model, [(mixed, 1.0)])
    assert summary == [{"name": "mixed.safetensors", "strength": 1.0, "layers": 1}]
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "2 text-encoder tensors left out" in messages and "lora_unet_down_blocks_0_attn" in messages


def test_loras_reach_packed_and_fp8_layers(files, changes):
    from flux_core.quant.linear import QuantLinear, dequantize_weight
    from flux_core.speed.fp8_linear import to_fp8

    model = load_transformer(files / "flux-tiny.safetensors", dtype=torch.float32, weights="int8")
    qkv = model.get_submodule("double_blocks.0.img_attn.qkv")
    assert isinstance(qkv, QuantLinear)
    lora.use_loras(model, standard(files))
    x = torch.randn(2, 5, lf.H)
    dense = dequantize_weight(qkv.storage, qkv.qweight, qkv.scale, None, (3 * lf.H, lf.H), torch.float32)
    merged = lf.merge({"double_blocks.0.img_attn.qkv.weight": dense},
                      {name: {k: v for k, v in c.items() if k == "double_blocks.0.img_attn.qkv"}
                       for name, c in changes.items()})
    want = torch.nn.functional.linear(x, merged["double_blocks.0.img_attn.qkv.weight"], qkv.bias)
    with torch.no_grad():
        assert tf.rel_l2(qkv(x), want) < 1e-5

    # fp8: the base matmul stays fp8 (its own rounding), the LoRA term comes on top of it, in bf16.
    bf16 = load_transformer(files / "flux-tiny.safetensors", dtype=torch.bfloat16)
    proj = to_fp8(bf16.get_submodule("single_blocks.0.linear2"))
    xb = torch.randn(2, 5, proj.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        base = proj(xb)
        lora.use_loras(bf16, standard(files))
        (change,) = changes[lf.KOHYA]["single_blocks.0.linear2"]
        delta = torch.nn.functional.linear(xb.float(), change[1] * lf.STRENGTHS[lf.KOHYA])
        assert tf.rel_l2(proj(xb).float() - base.float(), delta) < 0.02


def test_generate_takes_loras_per_call_and_records_them(tmp_path):
    import flux_core
    from flux_core.demo import demo_model_files
    from flux_core.pipeline import load_models

    paths = demo_model_files(tmp_path / "demo")
    models = load_models(paths["transformer"], paths["autoencoder"], paths["t5"], paths["clip"], dtype=torch.float32)
    lf.write_demo_lora(tmp_path / "demo-lora.safetensors")
    common = dict(image_size=64, num_inference_steps=3, seed=4, decode=False)

    plain = flux_core.generate("an orange", models, **common)
    styled = flux_core.generate("an orange", models, loras=[(tmp_path / "demo-lora.safetensors", 0.7)], **common)
    assert styled.settings["loras"] == [{"name": "demo-lora.safetensors", "strength": 0.7, "layers": 2}]
    assert tf.rel_l2(styled.latents, plain.latents) > 1e-3
    kept = flux_core.generate("an orange", models, **common)  # None: the model keeps its LoRAs
    assert torch.equal(kept.latents, styled.latents) and kept.settings["loras"] == styled.settings["loras"]
    off = flux_core.generate("an orange", models, loras=[], **common)
    assert "loras" not in off.settings and torch.equal(off.latents, plain.latents)


def test_cli_lora_option(tmp_path):
    env = dict(os.environ, FLUX_DEMO_DIR=str(tmp_path / "demo"))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "flux_core", *args], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=300)

    common = ("generate", "--demo", "--prompt", "an orange", "--image-size", "64", "--steps", "2", "--seed", "1",
              "--quiet")
    missing = cli(*common, "--lora", str(tmp_path / "nope.safetensors:0.5"), "--out", str(tmp_path / "x.png"))
    assert missing.returncode == 2 and "no such LoRA file" in missing.stderr and "nope.safetensors" in missing.stderr
    remote = cli("generate", "--prompt", "x", "--provider", "bfl", "--lora", "a.safetensors")
    assert remote.returncode == 2 and "--lora runs on the local engine" in remote.stderr

    lf.write_demo_lora(tmp_path / "l.safetensors", layers=("single_blocks.0.linear1",))
    ok = cli(*common, "--lora", str(tmp_path / "l.safetensors") + ":0.5", "--out", str(tmp_path / "o.png"))
    assert ok.returncode == 0, ok.stderr
    with Image.open(tmp_path / "o.png") as img:
        assert json.loads(img.text["loras"]) == [{"name": "l.safetensors", "strength": 0.5, "layers": 1}]


@pytest.mark.parametrize("spec,expected", [
    ("style.safetensors", ("style.safetensors", 1.0)),
    ("style.safetensors:0.65", ("style.safetensors", 0.65)),
    ("/a/b:c/style.safetensors:-1", ("/a/b:c/style.safetensors", -1.0)),
    ("C:\\loras\\style.safetensors", ("C:\\loras\\style.safetensors", 1.0)),
    ("C:\\loras\\style.safetensors:2", ("C:\\loras\\style.safetensors", 2.0)),
])
def test_lora_spec(spec, expected):
    assert lora.parse_lora_spec(spec) == expected


def test_loras_on_streamed_blocks(files):
    """Block streaming packs the blocks' tensors once; LoRAs put on afterwards apply all the same."""
    from flux_core.speed.offload import stream_transformer

    inputs = tf.make_inputs(tf.TINY)
    model = load_transformer(files / "flux-tiny.safetensors", dtype=torch.float32)
    lora.use_loras(model, standard(files))
    want = tf.run_flux(model, inputs)
    streamed = load_transformer(files / "flux-tiny.safetensors", dtype=torch.float32)
    streamer = stream_transformer(streamed, "cpu")
    try:
        lora.use_loras(streamed, standard(files))
        assert torch.equal(tf.run_flux(streamed, inputs), want)
    finally:
        streamer.detach()


def test_xlabs_layout(files, tmp_path):
    model = load_transformer(files / "flux-tiny.safetensors", dtype=torch.float32)
    gen = torch.Generator().manual_seed(6)
    tensors, want = {}, {}
    for stem, target, rows, out in (("double_blocks.1.processor.qkv_lora2", "double_blocks.1.txt_attn.qkv", None, 3 * lf.H),
                                    ("double_blocks.0.processor.proj_lora1", "double_blocks.0.img_attn.proj", None, lf.H),
                                    ("single_blocks.1.processor.qkv_lora", "single_blocks.1.linear1", (0, 3 * lf.H), 3 * lf.H),
                                    ("single_blocks.0.processor.proj_lora", "single_blocks.0.linear2", None, lf.H)):
        cols = model.get_submodule(target).in_features
        up, down = lf.low_rank(out, cols, gen)
        tensors.update({stem + ".down.weight": down, stem + ".up.weight": up})
        want[target] = (rows, up, down)
    save_file(tensors, str(tmp_path / "xlabs.safetensors"))
    layers = lora.read_lora(tmp_path / "xlabs.safetensors", model).layers
    assert {x.target: (x.rows, x.scale) for x in layers} == {t: (rows, 1.0) for t, (rows, _, _) in want.items()}
    for layer in layers:
        assert torch.equal(layer.up, want[layer.target][1]) and torch.equal(layer.down, want[layer.target][2])


@pytest.mark.host
def test_clip_l_layers_of_a_lora_match_comfyui(comfy, tmp_path, monkeypatch):
    """A kohya LoRA that trains CLIP-L too: the engine's pooled CLIP output (what FLUX conditions on) equals
    the host's after its own LoRA loading; the T5 output is untouched."""
    import sys

    import comfy.sd
    import comfy.utils

    import flux_core
    from comfy_import import imported_pack
    from flux_core.demo import demo_model_files
    from flux_core.lora.files import linear_shapes

    demo = demo_model_files()
    engine = flux_core.load_text_encoders(demo["t5"], demo["clip"], dtype=torch.float32)
    gen = torch.Generator().manual_seed(12)
    tensors = {}
    for name, (rows, cols) in linear_shapes(engine.clip).items():
        if ".layers." in name:
            up, down = lf.low_rank(rows, cols, gen)
            stem = "lora_te1_" + name.replace(".", "_")
            tensors.update({stem + ".lora_up.weight": up * 2, stem + ".lora_down.weight": down,
                            stem + ".alpha": torch.tensor(float(lf.RANK))})
    lf.write_demo_lora(tmp_path / "t.safetensors")  # and transformer layers, as such files have
    tensors.update(comfy.utils.load_torch_file(str(tmp_path / "t.safetensors")))
    save_file(tensors, str(tmp_path / "both.safetensors"))

    monkeypatch.setattr(comfy.cli_args.args, "fp32_text_enc", True)  # the host uses fp16 on a CPU otherwise
    with imported_pack("flux_juiced_pack_lora_test") as pack:
        host_models = sys.modules[f"{pack.__name__}.nodes.host_models"]
        host_models._cache.pop("text_encoders", None)
        clip = host_models.load_clip(str(demo["t5"]), str(demo["clip"]))
        _, patched = comfy.sd.load_lora_for_models(None, clip, comfy.utils.load_torch_file(
            str(tmp_path / "both.safetensors")), 0, 0.7)
        prompt = "a tabby cat asleep on a folded canvas awning"
        host_txt, host_vec = patched.encode_from_tokens(patched.tokenize(prompt), return_pooled=True)
        _, plain_vec = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
        host_models._cache.pop("text_encoders", None)

    transformer = load_transformer(demo["transformer"], dtype=torch.float32)
    summary = lora.use_loras(transformer, [(tmp_path / "both.safetensors", 0.7)], clip=engine.clip)
    clip_layers = sum(key.startswith("lora_te1_") and key.endswith(".lora_up.weight") for key in tensors)
    assert summary == [{"name": "both.safetensors", "strength": 0.7, "layers": 2, "clip_layers": clip_layers}]
    txt, vec = engine.encode([prompt])
    assert tf.rel_l2(host_vec, plain_vec) > 0.01, "the LoRA changed nothing in the host"
    torch.testing.assert_close(vec, host_vec, rtol=0, atol=2e-5)
    torch.testing.assert_close(txt, host_txt, rtol=0, atol=2e-5)
