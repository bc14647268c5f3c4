"""ComfyUI glue: node classes speaking the host's standard types (MODEL, CLIP, VAE, CONDITIONING, LATENT,
IMAGE). Node ids are forever: all start with FluxJuiced."""
from .loader_nodes import FluxJuicedTextEncoderLoader, FluxJuicedTransformerLoader, FluxJuicedVAELoader
from .remote_node import FluxJuicedRemoteTextToImage
from .sampler_node import FluxJuicedSampler
from .save_node import FluxJuicedSaveImage
from .speed_node import FluxJuicedSpeed
from .text_to_image_node import FluxJuicedTextToImage

NODE_CLASS_MAPPINGS = {
    "FluxJuicedTransformerLoader": FluxJuicedTransformerLoader,
    "FluxJuicedTextEncoderLoader": FluxJuicedTextEncoderLoader,
    "FluxJuicedVAELoader": FluxJuicedVAELoader,
    "FluxJuicedSampler": FluxJuicedSampler,
    "FluxJuicedTextToImage": FluxJuicedTextToImage,
    "FluxJuicedSaveImage": FluxJuicedSaveImage,
    "FluxJuicedRemoteTextToImage": FluxJuicedRemoteTextToImage,
    "FluxJuicedSpeed": FluxJuicedSpeed,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxJuicedTransformerLoader": "FLUX.1 Transformer Loader (Juiced)",
    "FluxJuicedTextEncoderLoader": "FLUX.1 Text Encoders Loader (Juiced)",
    "FluxJuicedVAELoader": "FLUX.1 VAE Loader (Juiced)",
    "FluxJuicedSampler": "FLUX.1 Sampler (Juiced)",
    "FluxJuicedTextToImage": "FLUX.1 [dev] Text to Image (Juiced)",
    "FluxJuicedSaveImage": "Save Image jpg/png/webp (Juiced)",
    "FluxJuicedRemoteTextToImage": "FLUX.1 [dev] Text to Image, Remote API (Juiced)",
    "FluxJuicedSpeed": "FLUX.1 Speed Mode (Juiced)",
}
