"""Loader nodes: the transformer, the text encoders and the autoencoder from ComfyUI's model folders, in
every layout the engine reads, returned as the host's standard MODEL, CLIP and VAE."""
from __future__ import annotations

from . import folders, host_models
from ..flux_core import presets
from .inputs import CATEGORY, validate


def _file_input(role: str, tooltip: str):
    return (folders.choices(role), {"tooltip": tooltip})


class FluxJuicedTransformerLoader:
    DESCRIPTION = ("Loads the FLUX.1 transformer from models/diffusion_models (or an all-in-one file in "
                   "models/checkpoints) in any layout: BFL, ComfyUI, diffusers, fp8, scaled fp8, GGUF (kept "
                   "quantized in memory). Returns a standard MODEL for native samplers, LoRA loaders and other "
                   "packs' patches.")
    CATEGORY = CATEGORY + "/loaders"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The FLUX.1 diffusion model.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "transformer_name": _file_input("transformer", "The transformer file, e.g. flux1-dev.safetensors or "
                                                           "flux1-dev-Q4_K_S.gguf."),
            "weight_dtype": (host_models.WEIGHT_DTYPES, {
                "default": "default",
                "tooltip": "Weight precision in memory; default lets ComfyUI pick for your GPU (bf16 on most). "
                           "int8 / fp8 store the block weights 8-bit with a per-row scale (about half of bf16) "
                           "and dequantize them layer by layer (with fp8, FLUX.1 Speed Mode runs them as fp8 "
                           "matmuls on GPUs that have them). GGUF files always stay quantized as stored. "
                           "LoRAs apply to quantized layers too, as each layer is dequantized."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, transformer_name, weight_dtype):
        # File names are checked when the node runs, so a missing file is an execution error naming the fix.
        return validate(lambda: presets.check_choice("weight_dtype", weight_dtype, host_models.WEIGHT_DTYPES))

    def load(self, transformer_name, weight_dtype):
        return (host_models.load_model(folders.resolve("transformer", transformer_name), weight_dtype),)


class FluxJuicedTextEncoderLoader:
    DESCRIPTION = ("Loads T5-XXL and CLIP-L from models/text_encoders (or an all-in-one checkpoint) in any layout "
                   "(fp16, fp8, scaled fp8, Hugging Face). Returns a standard CLIP of FLUX type; T5 is padded to "
                   "512 tokens as the reference does.")
    CATEGORY = CATEGORY + "/loaders"
    RETURN_TYPES = ("CLIP",)
    OUTPUT_TOOLTIPS = ("The FLUX text encoders, for CLIPTextEncode / CLIPTextEncodeFlux.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "t5_name": _file_input("t5", "The T5-XXL file, e.g. t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors."),
            "clip_name": _file_input("clip", "The CLIP-L file, e.g. clip_l.safetensors."),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, t5_name, clip_name):
        return True

    def load(self, t5_name, clip_name):
        return (host_models.load_clip(folders.resolve("t5", t5_name), folders.resolve("clip", clip_name)),)


class FluxJuicedVAELoader:
    DESCRIPTION = ("Loads the FLUX autoencoder from models/vae (or an all-in-one checkpoint), BFL or diffusers "
                   "layout. Returns a standard VAE.")
    CATEGORY = CATEGORY + "/loaders"
    RETURN_TYPES = ("VAE",)
    OUTPUT_TOOLTIPS = ("The FLUX autoencoder (16 latent channels).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae_name": _file_input("autoencoder", "The autoencoder file, e.g. ae.safetensors.")}}

    @classmethod
    def VALIDATE_INPUTS(cls, vae_name):
        return True

    def load(self, vae_name):
        return (host_models.load_vae(folders.resolve("autoencoder", vae_name)),)
