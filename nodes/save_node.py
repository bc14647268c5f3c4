"""Saving images as jpg, png or webp with quality, settings, seed and the workflow in the file."""
from __future__ import annotations

from . import host_step_cache, inputs, saving


class FluxJuicedSaveImage:
    DESCRIPTION = ("Saves images to the output folder as jpg, png or webp. The prompt, the pack's settings and "
                   "the seed go into the file's metadata, and the workflow is embedded as ComfyUI does (png and "
                   "webp always, jpg when it fits). Existing files are never overwritten.")
    CATEGORY = inputs.CATEGORY
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save."}),
                "filename_prefix": inputs.filename_prefix(),
                "output_format": inputs.output_format(),
                "output_quality": inputs.output_quality(),
            },
            "optional": {
                "seed": ("INT", {"forceInput": True, "tooltip": "The seed used (link the sampler's seed output) so "
                                                                "the real seed, not -1, is saved."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def save(self, images, filename_prefix, output_format, output_quality, seed=None, prompt=None,
             extra_pnginfo=None):
        parameters = saving.summarize_graph(prompt)
        parameters.update(host_step_cache.prompt_metadata())  # this prompt's speed-mode runs and their runtime choices
        if seed is not None:
            parameters["seeds"] = [seed + i for i in range(len(images))]
        saved = saving.save_batch(images, filename_prefix, output_format, output_quality, parameters,
                                  prompt=prompt, extra_pnginfo=extra_pnginfo)
        return {"ui": {"images": saved}}
