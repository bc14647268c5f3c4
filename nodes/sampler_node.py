"""The flow-matching sampler node: the reference schedule and seeded noise on any FLUX MODEL."""
from __future__ import annotations

from . import flux_sampling, inputs


class FluxJuicedSampler:
    DESCRIPTION = ("Samples FLUX.1 [dev] the reference way: flow-matching Euler steps on the resolution-dependent "
                   "shifted schedule (shift 0.5 at 256 tokens to 1.15 at 4096), distilled guidance set on the "
                   "conditioning, seeded noise (-1 = random; the seed used is an output). Works on any FLUX MODEL.")
    CATEGORY = inputs.CATEGORY
    RETURN_TYPES = ("LATENT", "INT")
    RETURN_NAMES = ("latent", "seed")
    OUTPUT_TOOLTIPS = ("The sampled latent, for VAEDecode.", "The seed actually used (image i of a batch: seed + i).")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A FLUX.1 model (this pack's loader or the native one)."}),
            "conditioning": ("CONDITIONING", {"tooltip": "The prompt, encoded by CLIPTextEncode(Flux)."}),
            "latent": ("LATENT", {"tooltip": "An empty latent (EmptySD3LatentImage) sets size and batch; a "
                                             "non-empty one is noised fully (text-to-image)."}),
            "seed": inputs.seed(),
            "steps": inputs.steps(),
            "guidance": inputs.guidance(),
        }}

    @classmethod
    def IS_CHANGED(cls, seed=None, **kwargs):
        return inputs.changed_when_random(seed)

    def sample(self, model, conditioning, latent, seed, steps, guidance):
        used = flux_sampling.resolve_seed(seed)
        result = flux_sampling.sample(model, conditioning, latent, used, steps, guidance)
        return {"ui": {"text": [f"seed {used}"]}, "result": (result, used)}
