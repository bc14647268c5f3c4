"""The all-in-one node: the design table's inputs in, a saved image (and IMAGE + seed) out."""
from __future__ import annotations

from ..flux_core import presets
from ..flux_core.model_files import MODEL_FILES
from . import flux_sampling, folders, host_models, inputs, saving, speed_node

_DEFAULT_FILES = {spec.role: spec.names[0] for spec in MODEL_FILES}


def _file(role: str, tooltip: str):
    names = folders.choices(role)
    default = _DEFAULT_FILES[role]
    return (names or [default], {"default": default if default in names or not names else names[0],
                                 "tooltip": tooltip})


class FluxJuicedTextToImage:
    DESCRIPTION = ("FLUX.1 [dev] text to image in one node: loads the models from ComfyUI's model folders (any "
                   "layout), samples the reference way with the speed mode's step caching (the full transformer "
                   "evaluations are counted in the metadata) and saves the image with its settings and seed. The same "
                   "inputs as the pack's remote-API node, so a graph can switch between local and hosted.")
    CATEGORY = inputs.CATEGORY
    RETURN_TYPES = ("IMAGE", "INT")
    RETURN_NAMES = ("image", "seed")
    OUTPUT_TOOLTIPS = ("The generated image(s).", "The seed actually used.")
    OUTPUT_NODE = True
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": inputs.job_inputs(),
            "optional": {
                "transformer_name": _file("transformer", "Transformer file in models/diffusion_models."),
                "t5_name": _file("t5", "T5-XXL file in models/text_encoders."),
                "clip_name": _file("clip", "CLIP-L file in models/text_encoders."),
                "vae_name": _file("autoencoder", "Autoencoder file in models/vae."),
                "filename_prefix": inputs.filename_prefix(),
            },
            "hidden": {"prompt_graph": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, transformer_name=None, t5_name=None, clip_name=None, vae_name=None):
        return True  # missing files fail at run time with a message naming the file and the fix

    @classmethod
    def IS_CHANGED(cls, seed=None, **kwargs):
        return inputs.changed_when_random(seed)

    def generate(self, prompt, aspect_ratio, speed_mode, num_inference_steps, guidance, seed, image_size,
                 output_format, output_quality, transformer_name=_DEFAULT_FILES["transformer"],
                 t5_name=_DEFAULT_FILES["t5"], clip_name=_DEFAULT_FILES["clip"],
                 vae_name=_DEFAULT_FILES["autoencoder"], filename_prefix="flux_juiced/FLUX", prompt_graph=None,
                 extra_pnginfo=None):
        if not prompt.strip():
            raise ValueError("prompt is empty: describe the image to generate")
        width, height = presets.dimensions(aspect_ratio, image_size)
        used = flux_sampling.resolve_seed(seed)
        paths = {role: folders.resolve(role, name) for role, name in
                 (("transformer", transformer_name), ("t5", t5_name), ("clip", clip_name), ("autoencoder", vae_name))}
        clip = host_models.load_clip(paths["t5"], paths["clip"])
        conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        import comfy.model_management

        from .host_precision import transformer_storage

        # the weights a mode's fp8 matmuls run from (fp8 on GPUs that have them, as the engine stores them)
        storage = transformer_storage(speed_mode, comfy.model_management.get_torch_device())
        model, step_cache = speed_node.apply_speed_mode(host_models.load_model(paths["transformer"], storage),
                                                        speed_mode)
        latent = flux_sampling.sample(model, conditioning, flux_sampling.empty_latent(width, height), used,
                                      num_inference_steps, guidance)
        images = host_models.load_vae(paths["autoencoder"]).decode(latent["samples"])
        parameters = {"prompt": prompt, "aspect_ratio": aspect_ratio, "width": width, "height": height,
                      "speed_mode": speed_mode, "num_inference_steps": num_inference_steps, "guidance": guidance,
                      "seed": used, "model": transformer_name}
        run = step_cache.last_run if step_cache else None  # full transformer evaluations per image
        parameters["evaluations"] = run["full_evaluations"] if run else num_inference_steps
        if run:
            parameters["step_cache"] = run
        if step_cache and step_cache.acceleration:
            parameters["acceleration"] = step_cache.acceleration  # compile / attention / precision, with reasons
        saved = saving.save_batch(images, filename_prefix, output_format, output_quality, parameters,
                                  prompt=prompt_graph, extra_pnginfo=extra_pnginfo)
        return {"ui": {"images": saved, "text": [f"seed {used}"]}, "result": (images, used)}
