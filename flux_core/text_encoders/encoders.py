"""Loading T5 and CLIP, and turning prompts into FLUX's conditioning (txt, vec)."""
from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator

import torch

from ..checkpoints.materialize import LoadPlan
from ..checkpoints.reader import open_checkpoint
from .clip import CLIPConfig, CLIPTextModel
from .keys import clip_sources, infer_clip_config, infer_t5_config, resolve_folder, t5_sources
from .t5 import T5Config, T5Encoder
from .tokenization import Tokenizers, load_tokenizers


def _t5_dtype_for(dtype: torch.dtype):
    # In fp16, T5's last feed-forward projection overflows; keep it in fp32 as the reference libraries do
    if dtype != torch.float16:
        return None
    return lambda name: torch.float32 if name.endswith("DenseReluDense.wo.weight") else None


@contextmanager
def t5_plan(path, dtype: torch.dtype | None = None) -> Iterator[LoadPlan]:
    """The T5 encoder in `path`, built on meta, with the sources that fill it (file open while in use)."""
    with open_checkpoint(resolve_folder(path, "t5")) as tf:
        sources = t5_sources(tf)
        cfg = infer_t5_config(sources, tf.path)
        with torch.device("meta"):
            model = T5Encoder(cfg)
        yield LoadPlan(model, sources, tf.path, "T5 encoder", _t5_dtype_for(dtype))


@contextmanager
def clip_plan(path) -> Iterator[LoadPlan]:
    """The CLIP text model in `path`, built on meta, with the sources that fill it."""
    with open_checkpoint(resolve_folder(path, "clip")) as tf:
        sources = clip_sources(tf)
        cfg = infer_clip_config(sources, tf.path)
        with torch.device("meta"):
            model = CLIPTextModel(cfg)
        yield LoadPlan(model, sources, tf.path, "CLIP text encoder")


def load_t5(path, device="cpu", dtype: torch.dtype = torch.bfloat16) -> T5Encoder:
    """A T5 encoder from any supported file or folder; its config comes from the tensor shapes."""
    with t5_plan(path, dtype) as plan:
        return plan.materialize(device=device, dtype=dtype)


def load_clip(path, device="cpu", dtype: torch.dtype = torch.bfloat16) -> CLIPTextModel:
    """A CLIP text model from any supported file or folder; its config comes from the tensor shapes."""
    with clip_plan(path) as plan:
        return plan.materialize(device=device, dtype=dtype)


def random_text_encoders(t5_config: T5Config, clip_config: CLIPConfig, tokenizer_dir=None, device="cpu",
                         dtype: torch.dtype = torch.bfloat16, seed: int = 0, t5_max_length: int = 512):
    """Randomly initialised encoders (demo mode, tests): real tokenizers, made-up weights."""
    gen = torch.Generator().manual_seed(seed)
    models = []
    for model in (T5Encoder(t5_config), CLIPTextModel(clip_config)):
        for name, p in model.named_parameters():
            with torch.no_grad():
                if name.endswith("layer_norm.weight") or name.endswith("norm1.weight") \
                        or name.endswith("norm2.weight"):
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if p.ndim < 2 else p.shape[-1] ** -0.5))
        models.append(model.to(device=device, dtype=dtype).eval().requires_grad_(False))
    t5, clip = models
    toks = load_tokenizers(tokenizer_dir, t5_max_length, clip_config.max_positions)
    return TextEncoders(t5, clip, toks, device=device, dtype=dtype)


class TextEncoders:
    """T5 + CLIP + their tokenizers. encode(prompts) -> (txt (B, L, d_t5), vec (B, d_clip)).

    Each encoder runs where its weights are (move_t5("cpu") offloads T5, free_t5() drops it); the
    outputs are returned on `device` in `dtype`.
    """

    def __init__(self, t5: T5Encoder | None, clip: CLIPTextModel | None, tokenizers: Tokenizers,
                 device="cpu", dtype: torch.dtype = torch.bfloat16):
        self.t5 = t5
        self.clip = clip
        self.tokenizers = tokenizers
        self.device = torch.device(device)
        self.dtype = dtype

    @property
    def t5_max_length(self) -> int:
        return self.tokenizers.t5.max_length

    @staticmethod
    def _batch(prompts) -> list[str]:
        if isinstance(prompts, str):
            return [prompts]
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("encode() takes a prompt string or a non-empty list of prompt strings")
        return prompts

    def _need(self, which: str):
        model = getattr(self, which)
        if model is None:
            raise RuntimeError(f"the {which.upper()} encoder was freed; load the text encoders again")
        return model

    @torch.inference_mode()
    def encode_t5(self, prompts) -> torch.Tensor:
        t5 = self._need("t5")
        ids = self.tokenizers.t5(self._batch(prompts)).to(t5.device)
        return t5(ids).to(device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def encode_clip(self, prompts) -> torch.Tensor:
        clip = self._need("clip")
        ids = self.tokenizers.clip(self._batch(prompts)).to(clip.device)
        return clip(ids)[1].to(device=self.device, dtype=self.dtype)

    def encode(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """(txt, vec): T5's last hidden state (B, t5_max_length, d_model) and CLIP's pooled (B, hidden)."""
        prompts = self._batch(prompts)
        return self.encode_t5(prompts), self.encode_clip(prompts)

    __call__ = encode

    # --- memory management: T5-XXL alone is ~9.5 GB in bf16 ---------------------------------------------
    def move_t5(self, device):
        self._need("t5").to(device)
        return self

    def move_clip(self, device):
        self._need("clip").to(device)
        return self

    def to(self, device):
        """Move both encoders and make `device` the output device."""
        for which in ("t5", "clip"):
            if getattr(self, which) is not None:
                getattr(self, which).to(device)
        self.device = torch.device(device)
        return self

    def free_t5(self):
        self.t5 = None
        _release()
        return self

    def free_clip(self):
        self.clip = None
        _release()
        return self


def _release():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_text_encoders(t5_path, clip_path=None, tokenizer_dir=None, device="cpu",
                       dtype: torch.dtype = torch.bfloat16, t5_max_length: int = 512) -> TextEncoders:
    """T5 and CLIP from their files (or one all-in-one file / diffusers root for both: clip_path=None).

    dtype is the compute and output dtype; fp8 files are dequantized to it. t5_max_length: 512 for dev,
    256 for schnell.
    """
    if clip_path is None:
        clip_path = t5_path
    # tokenizers first: a missing tokenizer should fail before gigabytes are read
    toks = load_tokenizers(tokenizer_dir, t5_max_length)
    t5 = load_t5(t5_path, device=device, dtype=dtype)
    clip = load_clip(clip_path, device=device, dtype=dtype)
    if clip.config.max_positions != toks.clip.max_length:
        toks = load_tokenizers(tokenizer_dir, t5_max_length, clip.config.max_positions)
    return TextEncoders(t5, clip, toks, device=device, dtype=dtype)
