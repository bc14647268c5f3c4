"""FLUX's text encoders: T5-XXL (per-token context, `txt`) and CLIP-L (pooled vector, `vec`).

    enc = load_text_encoders("t5xxl_fp16.safetensors", "clip_l.safetensors")
    txt, vec = enc.encode(["a photo of a cat"])   # (1, 512, 4096), (1, 768) in enc.dtype

Own implementations with the Hugging Face / ComfyUI parameter names, configs read from the weights,
tokenizers from ComfyUI's (or diffusers') standard tokenizer files.
"""
from .clip import CLIP_L, TINY_CLIP, CLIPConfig, CLIPTextModel, heads_for
from .encoders import TextEncoders, load_clip, load_t5, load_text_encoders, random_text_encoders
from .keys import clip_sources, infer_clip_config, infer_t5_config, t5_sources
from .t5 import T5_XXL, TINY_T5, T5Config, T5Encoder
from .tokenization import CLIPTokenizer, T5Tokenizer, Tokenizers, find_tokenizer_folders, load_tokenizers

__all__ = [
    "CLIP_L", "TINY_CLIP", "CLIPConfig", "CLIPTextModel", "heads_for",
    "T5_XXL", "TINY_T5", "T5Config", "T5Encoder",
    "TextEncoders", "load_text_encoders", "load_t5", "load_clip", "random_text_encoders",
    "t5_sources", "clip_sources", "infer_t5_config", "infer_clip_config",
    "T5Tokenizer", "CLIPTokenizer", "Tokenizers", "find_tokenizer_folders", "load_tokenizers",
]
