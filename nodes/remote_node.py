"""The remote-API node: the all-in-one node's inputs plus a provider; the job runs at the hosted provider.

Keys come from the environment or the keys file (flux_core.remote.keys), never from a widget, so they
never reach a workflow, the history or an image. The outputs line up with the local node's (IMAGE, seed)
so swapping the two keeps the links; the provider's metadata is a third output.
"""
from __future__ import annotations

import json

from ..flux_core.remote import DEFAULT_PROVIDER, KEY_ENV, NAMES, Interrupted, generate_remote
from . import inputs, saving


def _provider():
    keys = ", ".join(f"{name}: {env}" for name, env in KEY_ENV.items())
    return (NAMES, {"default": DEFAULT_PROVIDER,
                    "tooltip": "Where FLUX.1 [dev] runs. The key is read from the environment of the ComfyUI "
                               f"process ({keys}) or from the keys file, never from the graph. "
                               "See docs/remote.md."})


def _to_tensor(image):
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


class FluxJuicedRemoteTextToImage:
    DESCRIPTION = ("FLUX.1 [dev] text to image at a hosted provider (inference.sh, Black Forest Labs, fal.ai, "
                   "Replicate, CometAPI) with the same inputs as the local all-in-one node, so a graph switches "
                   "between local and hosted by swapping one node. Saves the image; what the provider could not "
                   "take as asked is listed in the metadata. Keys come from the environment, never the graph.")
    CATEGORY = inputs.CATEGORY
    RETURN_TYPES = ("IMAGE", "INT", "STRING")
    RETURN_NAMES = ("image", "seed", "metadata")
    OUTPUT_TOOLTIPS = ("The generated image (RGB).", "The seed actually used.",
                       "The provider's metadata as JSON: provider, task id, inputs sent, adjustments, timings "
                       "(never a key).")
    OUTPUT_NODE = True
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "provider": _provider(),  # first: the one input the local node lacks
                **inputs.job_inputs(),
            },
            "optional": {
                "filename_prefix": inputs.filename_prefix("flux_juiced/FLUX_remote"),
            },
            "hidden": {"prompt_graph": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    @classmethod
    def IS_CHANGED(cls, seed=None, **kwargs):
        return inputs.changed_when_random(seed)

    def generate(self, provider, prompt, aspect_ratio, speed_mode, num_inference_steps, guidance, seed, image_size,
                 output_format, output_quality, filename_prefix="flux_juiced/FLUX_remote", prompt_graph=None,
                 extra_pnginfo=None):
        import comfy.model_management
        import comfy.utils

        bar = comfy.utils.ProgressBar(100)

        def progress(fraction, text):
            if fraction is not None:
                bar.update_absolute(int(round(100 * fraction)), 100)

        try:
            result = generate_remote(prompt, provider, aspect_ratio=aspect_ratio, speed_mode=speed_mode,
                                     num_inference_steps=num_inference_steps, guidance=guidance, seed=seed,
                                     image_size=image_size, output_format=output_format,
                                     output_quality=output_quality,
                                     is_cancelled=comfy.model_management.processing_interrupted, progress=progress)
        except Interrupted:
            comfy.model_management.throw_exception_if_processing_interrupted()  # the host's own "interrupted"
            raise
        bar.update_absolute(100, 100)
        meta = result.metadata
        images = _to_tensor(result.image)
        parameters = {"prompt": prompt, "aspect_ratio": aspect_ratio, "width": meta["width"], "height": meta["height"],
                      "speed_mode": speed_mode, "num_inference_steps": num_inference_steps, "guidance": guidance,
                      "seed": result.seed, "provider": meta["provider"], "model": meta["model"],
                      "task_id": meta["task_id"], "adjustments": meta["adjustments"]}
        saved = saving.save_batch(images, filename_prefix, output_format, output_quality, parameters,
                                  prompt=prompt_graph, extra_pnginfo=extra_pnginfo)
        notes = [f"{a['input']} {a['asked']!r} " + (f"sent as {a['sent']!r}" if a["sent"] is not None else "not used")
                 + f": {a['why']}" for a in meta["adjustments"]]
        text = [f"seed {result.seed}", f"{meta['provider']} task {meta['task_id']}"] + notes
        return {"ui": {"images": saved, "text": text},
                "result": (images, result.seed, json.dumps(meta, ensure_ascii=False))}
