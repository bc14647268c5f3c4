"""Sampling: schedule against the reference formula and diffusers' scheduler, packing, noise, and the
whole denoising loop against diffusers' FluxPipeline given the same embeddings and initial latents."""
import math

import numpy as np
import pytest
import torch

from flux_core import sampling
from flux_core.loaders import load_transformer


def reference_schedule(num_steps, seq_len, base_shift=0.5, max_shift=1.15):
    """The reference formula written out independently: linear mu in seq_len, exponential time shift."""
    mu = base_shift + (max_shift - base_shift) * (seq_len - 256) / (4096 - 256)
    out = []
    for i in range(num_steps + 1):
        t = 1 - i / num_steps
        out.append(0.0 if t == 0 else math.exp(mu) / (math.exp(mu) + (1 / t - 1)))
    return out


@pytest.mark.parametrize("steps,seq_len", [(4, 4096), (28, 4096), (28, 1024), (1, 256), (50, 6144), (15, 2304)])
def test_schedule_matches_reference_formula(steps, seq_len):
    got = sampling.get_schedule(steps, seq_len)
    assert len(got) == steps + 1 and got[0] == 1.0 and got[-1] == 0.0
    np.testing.assert_allclose(got, reference_schedule(steps, seq_len), rtol=0, atol=1e-6)


def test_schedule_known_values_and_no_shift():
    np.testing.assert_allclose(sampling.get_schedule(4, 4096), [1.0, 0.904531, 0.759511, 0.512844, 0.0], atol=1e-6)
    np.testing.assert_allclose(sampling.get_schedule(4, 4096, shift=False), [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-7)
    with pytest.raises(ValueError):
        sampling.get_schedule(0, 4096)


def test_schedule_matches_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                            max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    steps, seq_len = 28, 1024
    mu = sampling.get_lin_function()(seq_len)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    np.testing.assert_allclose(sampling.get_schedule(steps, seq_len), sched.sigmas.numpy(), atol=1e-6)


def test_pack_unpack_roundtrip_and_layout():
    x = torch.randn(2, 16, 6, 10)
    packed = sampling.pack(x)
    assert packed.shape == (2, 15, 64)
    # token (row 1, col 2), feature c*4 + ph*2 + pw == x[c, 2*1+ph, 2*2+pw]
    token = 1 * 5 + 2
    assert packed[1, token, 3 * 4 + 1 * 2 + 0] == x[1, 3, 3, 4]
    assert torch.equal(sampling.unpack(packed, 48, 80), x)
    ids = sampling.image_ids(2, 6, 10)
    assert ids.shape == (2, 15, 3) and ids[0, token].tolist() == [0, 1, 2]


def test_noise_is_seeded_and_device_independent_shape():
    a = sampling.get_noise(1, 100, 200, "cpu", torch.float32, seed=7)
    b = sampling.get_noise(1, 100, 200, "cpu", torch.float32, seed=7)
    c = sampling.get_noise(1, 100, 200, "cpu", torch.float32, seed=8)
    assert a.shape == (1, 16, 14, 26)
    assert torch.equal(a, b) and not torch.equal(a, c)


def _tiny_diffusers_transformer(seed=0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                   attention_head_dim=128, num_attention_heads=2, joint_attention_dim=64,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if p.ndim == 1 and p.shape[0] == 128 else 0.0))
    return model.eval()


def test_denoise_matches_diffusers_flux_pipeline(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from safetensors.torch import save_file

    ref_model = _tiny_diffusers_transformer()
    save_file({k: v.contiguous() for k, v in ref_model.state_dict().items()}, tmp_path / "t.safetensors")
    ours = load_transformer(tmp_path / "t.safetensors", dtype=torch.float32)

    height, width, steps, guidance = 64, 96, 6, 3.5
    torch.manual_seed(1)
    txt = torch.randn(1, 12, 64)
    vec = torch.randn(1, 32)
    noise = sampling.get_noise(1, height, width, "cpu", torch.float32, seed=3)
    inp = sampling.prepare(noise, txt, vec)
    seen = []
    out = sampling.denoise(ours, **inp, timesteps=sampling.get_schedule(steps, inp["img"].shape[1]),
                           guidance=guidance, callback=lambda info: seen.append(info.step))
    assert seen == list(range(1, steps + 1))

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                            max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(scheduler=sched, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=ref_model)
    with torch.no_grad():
        ref = pipe(prompt_embeds=txt, pooled_prompt_embeds=vec, latents=inp["img"].clone(), height=height,
                   width=width, num_inference_steps=steps, guidance_scale=guidance, output_type="latent").images
    scale = ref.abs().max().item()
    diff = (out - ref).abs().max().item()
    assert diff < 1e-4 * max(1.0, scale), f"max diff {diff} (scale {scale})"
    # The loop must actually move the latent: a no-op would be far from the reference.
    assert (inp["img"] - ref).abs().max().item() > 100 * max(diff, 1e-6)
