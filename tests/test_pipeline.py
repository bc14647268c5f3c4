"""generate() end to end on the tiny demo weights, and the CLI as a new user runs it."""
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

import flux_core
from flux_core import sampling
from flux_core.demo import demo_model_files
from flux_core.pipeline import load_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    paths = demo_model_files(tmp_path_factory.mktemp("demo"))
    return load_models(paths["transformer"], paths["autoencoder"], paths["t5"], paths["clip"], dtype=torch.float32)


def test_generate_reports_seed_size_and_evaluations(models):
    steps = []
    result = flux_core.generate("a red cube", models, aspect_ratio="16:9", image_size=128, num_inference_steps=3,
                                seed=-1, callback=lambda info: steps.append((info.step, info.total)))
    assert (result.width, result.height) == (128, 80)
    assert result.images[0].size == (128, 80) and result.images[0].mode == "RGB"
    assert result.latents.shape == (1, 16, 10, 16)
    assert steps == [(1, 3), (2, 3), (3, 3)] and result.evaluations == 3
    assert 0 <= result.seeds[0] < 2**32 and result.settings["seed"] == result.seeds[0]


def test_same_seed_same_image_and_variations_use_consecutive_seeds(models):
    kw = dict(image_size=64, num_inference_steps=2)
    a = flux_core.generate("a red cube", models, seed=11, **kw)
    b = flux_core.generate("a red cube", models, seed=11, **kw)
    assert torch.equal(a.latents, b.latents)
    batch = flux_core.generate("a red cube", models, seed=11, num_images=3, **kw)
    assert batch.seeds == [11, 12, 13] and len(batch.images) == 3
    alone = flux_core.generate("a red cube", models, seed=12, **kw)
    torch.testing.assert_close(batch.latents[1:2], alone.latents, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(batch.latents[0], batch.latents[1])


def test_generate_equals_the_reference_steps_composed_by_hand(models):
    prompt, seed, steps, guidance, size = "a lighthouse at dusk", 5, 3, 3.5, 64
    result = flux_core.generate(prompt, models, image_size=size, num_inference_steps=steps, guidance=guidance,
                                seed=seed)
    with torch.inference_mode():
        txt, vec = models.text_encoders.encode([prompt])
        noise = sampling.get_noise(1, size, size, "cpu", torch.float32, seed)
        inp = sampling.prepare(noise, txt.float(), vec.float())
        x = sampling.denoise(models.transformer, **inp, timesteps=sampling.get_schedule(steps, inp["img"].shape[1]),
                             guidance=guidance)
        latents = sampling.unpack(x.float(), size, size)
    assert torch.equal(result.latents, latents)
    # Guidance, prompt and steps all matter (none silently ignored).
    for change in ({"guidance": 1.0}, {"prompt": "a cat"}, {"num_inference_steps": 4}):
        kw = dict(prompt=prompt, image_size=size, num_inference_steps=steps, guidance=guidance, seed=seed) | change
        other = flux_core.generate(kw.pop("prompt"), models, **kw)
        assert not torch.allclose(other.latents, result.latents), change


def test_initial_noise_and_cancellation(models):
    noise = sampling.get_noise(1, 64, 64, "cpu", torch.float32, seed=99)
    a = flux_core.generate("x", models, image_size=64, num_inference_steps=2, initial_noise=noise)
    b = flux_core.generate("x", models, image_size=64, num_inference_steps=2, seed=99)
    assert torch.equal(a.latents, b.latents)
    with pytest.raises(ValueError, match="initial_noise"):
        flux_core.generate("x", models, image_size=64, num_inference_steps=2, initial_noise=noise[:, :, :4])

    class Cancelled(Exception):
        pass

    def cancel_at_two(info):
        if info.step == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        flux_core.generate("x", models, image_size=64, num_inference_steps=5, callback=cancel_at_two)


@pytest.mark.parametrize("kwargs,name", [({"num_inference_steps": 0}, "num_inference_steps"),
                                         ({"guidance": 11.0}, "guidance"), ({"seed": -5}, "seed"),
                                         ({"aspect_ratio": "7:3"}, "aspect_ratio"), ({"image_size": 10}, "image_size")])
def test_bad_inputs_name_the_input(models, kwargs, name):
    with pytest.raises(ValueError, match=name):
        flux_core.generate("x", models, **kwargs)


def _cli(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "flux_core", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_cli_demo_writes_an_image_with_metadata_and_never_overwrites(tmp_path):
    import os

    env = dict(os.environ, FLUX_DEMO_DIR=str(tmp_path / "demo"))
    args = ("generate", "--demo", "--prompt", "an orange", "--out", str(tmp_path / "o.png"), "--image-size", "64",
            "--steps", "2", "--seed", "7")
    first = _cli(*args, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    assert "DEMO" in first.stderr and "noise" in first.stderr
    assert "seed 7" in first.stdout
    second = _cli(*args, cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stderr
    assert (tmp_path / "o.png").exists() and (tmp_path / "o_1.png").exists()
    with Image.open(tmp_path / "o.png") as img:
        assert img.size == (64, 64)
        assert img.text["prompt"] == "an orange" and json.loads(img.text["seed"]) == 7
    # Same seed, same weights: the same pixels.
    with Image.open(tmp_path / "o.png") as a, Image.open(tmp_path / "o_1.png") as b:
        assert a.tobytes() == b.tobytes()


def test_cli_without_weights_says_which_files_to_get(tmp_path):
    result = _cli("generate", "--prompt", "x", "--models-dir", str(tmp_path / "models"), cwd=tmp_path)
    assert result.returncode != 0
    for needed in ("diffusion_models/flux1-dev.safetensors", "vae/ae.safetensors",
                   "text_encoders/t5xxl_fp16.safetensors", "text_encoders/clip_l.safetensors", "huggingface.co",
                   "--demo"):
        assert needed in result.stderr + result.stdout, needed


def test_models_dir_finds_gguf_transformers_after_the_dense_file(tmp_path):
    from flux_core.model_files import find_model_files

    folder = tmp_path / "diffusion_models"
    folder.mkdir()
    for name in ("flux1-dev-Q4_0.gguf", "flux1-dev-Q8_0.gguf", "flux1-dev-IQ2_XS.gguf"):
        (folder / name).write_bytes(b"")
    assert find_model_files(tmp_path)["transformer"] == folder / "flux1-dev-Q8_0.gguf"  # the finest listed type
    (folder / "flux1-dev.safetensors").write_bytes(b"")
    assert find_model_files(tmp_path)["transformer"] == folder / "flux1-dev.safetensors"


def test_cli_speed_mode_reports_fewer_full_evaluations_and_refuses_bad_names(tmp_path):
    import os

    env = dict(os.environ, FLUX_DEMO_DIR=str(tmp_path / "demo"))
    common = ("generate", "--demo", "--prompt", "an orange", "--image-size", "64", "--steps", "28", "--seed", "3",
              "--quiet")
    blink = _cli(*common, "--speed-mode", "blink", "--out", str(tmp_path / "b.png"), cwd=tmp_path, env=env)
    assert blink.returncode == 0, blink.stderr
    assert "6 transformer evaluations" in blink.stdout
    exact = _cli(*common, "--speed-mode", "off", "--out", str(tmp_path / "o.png"), cwd=tmp_path, env=env)
    assert exact.returncode == 0 and "28 transformer evaluations" in exact.stdout
    with Image.open(tmp_path / "b.png") as img:
        assert img.text["speed_mode"] == "Blink of an eye 👁️"
    bad = _cli(*common, "--speed-mode", "ludicrous", cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "speed_mode" in bad.stderr
