"""Sampling a host MODEL the reference way: the resolution-dependent shifted schedule, seeded noise,
distilled guidance on the conditioning, Euler steps, through the host's own sampler machinery so
progress, previews, interruption, patches and wrappers all work."""
from __future__ import annotations

import torch


def resolve_seed(seed: int) -> int:
    from ..flux_core.pipeline import resolve_seed as engine_resolve_seed

    return engine_resolve_seed(seed)


def empty_latent(width: int, height: int, batch: int = 1) -> dict:
    from ..flux_core.sampling import LATENT_CHANNELS, latent_size

    h, w = latent_size(height, width)
    return {"samples": torch.zeros(batch, LATENT_CHANNELS, h, w)}


def sample(model, conditioning, latent: dict, seed: int, steps: int, guidance: float) -> dict:
    """A new LATENT dict sampled from `latent` (empty latents give text-to-image). seed must be resolved."""
    import comfy.sample
    import comfy.samplers
    import latent_preview
    import node_helpers
    from ..flux_core import sampling

    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    batch, _, h, w = samples.shape
    # Image i of a batch uses seed + i, so any image of it can be remade alone (as in the engine).
    noise = torch.cat([sampling.get_noise(1, h * 8, w * 8, "cpu", torch.float32, seed + i) for i in range(batch)])
    sigmas = torch.tensor(sampling.get_schedule(steps, (h // 2) * (w // 2)), dtype=torch.float32)
    positive = node_helpers.conditioning_set_values(conditioning, {"guidance": float(guidance)})
    callback = latent_preview.prepare_callback(model, steps)
    sampler = comfy.samplers.sampler_object("euler")
    out = comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, positive, positive, samples,
                                     noise_mask=latent.get("noise_mask"), callback=callback,
                                     disable_pbar=True, seed=seed)
    result = latent.copy()
    result.pop("noise_mask", None)
    result["samples"] = out
    return result
