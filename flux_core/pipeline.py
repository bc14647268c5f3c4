"""Prompt to image: text encoding, seeded noise, flow-matching sampling and decoding."""
from __future__ import annotations

import contextlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import presets, sampling
from .lora import applied_loras, use_loras
from .speed import presets as speed_presets
from .speed.caching import StepCache


@dataclass
class FluxModels:
    """The three parts of a FLUX.1 pipeline, loaded once and reused for many images."""

    transformer: torch.nn.Module
    autoencoder: torch.nn.Module
    text_encoders: object  # has encode(list_of_prompts) -> (txt, vec)
    memory: object = None  # speed.placement.MemoryManager when offload or a T5 policy places the parts


def load_models(transformer, autoencoder, t5, clip, tokenizer_dir=None, device="cpu",
                dtype: torch.dtype = torch.bfloat16, ae_dtype: torch.dtype = torch.float32,
                offload: str = "none", vram_budget_gb: float | None = None, t5_policy: str = "keep",
                plan_size: tuple[int, int] = (1024, 1024), weights: str = "auto") -> FluxModels:
    """Load every part from files (any supported layout).

    weights: the transformer's weight storage ("auto", "dense", "int8", "fp8"; see load_transformer).

    Low memory (docs/low_memory.md): offload "blocks"/"auto" streams transformer blocks through `device`
    within vram_budget_gb (GiB; default the card's memory) for images of plan_size (width, height);
    t5_policy "keep", "offload", "cpu", "free" or "auto". A first plan from the files' headers says where
    to load (CPU memory when anything will stream, else straight to `device`); the final plan is made from
    the loaded modules (models.memory.plan).
    """
    from .loaders import load_autoencoder, load_text_encoders, load_transformer

    plan = None
    if offload != "none" or t5_policy != "keep" or vram_budget_gb is not None:
        from .speed.placement import plan_for_files

        plan = plan_for_files(transformer, autoencoder, t5, clip, device, dtype=dtype, ae_dtype=ae_dtype,
                              offload=offload, budget_gib=vram_budget_gb, t5_policy=t5_policy,
                              width=plan_size[0], height=plan_size[1])
    load_device = device if plan is None or plan.all_resident else "cpu"  # streamed parts start in CPU memory
    models = FluxModels(
        transformer=load_transformer(transformer, device=load_device, dtype=dtype, weights=weights),
        autoencoder=load_autoencoder(autoencoder, device=load_device, dtype=ae_dtype),
        text_encoders=load_text_encoders(t5, clip, tokenizer_dir=tokenizer_dir, device=load_device, dtype=dtype),
    )
    if plan is not None:  # planned again from the loaded modules: exact sizes, quantized storage included
        from functools import partial

        from .speed.placement import manage_memory
        from .text_encoders import load_t5

        models.memory = manage_memory(models, device, offload=offload, budget_gib=vram_budget_gb,
                                      t5_policy=t5_policy, width=plan_size[0], height=plan_size[1],
                                      t5_loader=partial(load_t5, t5, device="cpu", dtype=dtype))
    return models


@dataclass
class GenerationResult:
    images: list                  # PIL images, one per (prompt, variation)
    seeds: list[int]              # the seed each image was made from
    prompts: list[str]
    width: int
    height: int
    latents: Tensor               # final unpacked latents (B, 16, H/8, W/8), autoencoder-scaled
    evaluations: int              # full transformer evaluations per image (fewer than steps with step caching)
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)


def resolve_seed(seed: int) -> int:
    """-1 draws a random seed; anything else must be a non-negative integer."""
    if seed == -1:
        return secrets.randbits(32)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= presets.SEED_MAX:
        raise ValueError(f"seed must be -1 (random) or an integer from 0 to {presets.SEED_MAX}; got {seed!r}")
    return seed


def latents_to_images(pixels: Tensor) -> list:
    """Decoder output in [-1, 1], (B, 3, H, W) -> RGB PIL images."""
    from PIL import Image

    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, mode="RGB") for a in arr]


class _CountingModel:
    """Wraps the transformer to count evaluations (reported with every image)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, **kwargs):
        self.calls += 1
        return self.model(**kwargs)


def _accelerate(model, speed_mode, memory):
    """A speed mode's compile / precision / attention (speed.runtime), applied once per model and kept.
    "off" restores what can be restored on a model a mode changed before; an untouched model stays so."""
    from .speed import runtime

    mode = speed_presets.resolve(speed_mode)
    if mode is None and runtime.current(model) is None:
        return None
    streamed = memory is not None and getattr(memory, "transformer_streamer", None) is not None
    return runtime.accelerate(model, mode or speed_presets.OFF, device=memory.device if memory else None,
                              streamed=streamed)


@torch.inference_mode()
def generate(prompt: str | Sequence[str], models: FluxModels | None = None, *, transformer=None, autoencoder=None,
             text_encoders=None, aspect_ratio: str = presets.DEFAULT_ASPECT_RATIO,
             image_size: int = presets.DEFAULT_IMAGE_SIZE, num_inference_steps: int = presets.DEFAULT_STEPS,
             guidance: float = presets.DEFAULT_GUIDANCE, seed: int = -1, num_images: int = 1,
             width: int | None = None, height: int | None = None, initial_noise: Tensor | None = None,
             callback: Callable[[sampling.StepInfo], None] | None = None, decode: bool = True,
             speed_mode: str | None = None, loras: Sequence[tuple[str, float]] | None = None) -> GenerationResult:
    """Generate num_images images per prompt.

    Image i of a prompt uses seed + i, so any image can be remade alone. width/height, when given,
    override aspect_ratio/image_size (rounded down to multiples of 16). initial_noise (B, 16, H/8, W/8)
    replaces the seeded noise. callback sees every step (raise from it to cancel). speed_mode (one of
    speed.SPEED_MODES or a short alias) turns on step caching and the mode's compile / precision /
    attention choices (speed.runtime; what was chosen and why is in settings["acceleration"]); None or
    "off" samples exactly as the reference. result.evaluations counts the full transformer evaluations per
    image either way. loras: (file, strength) pairs to put on the transformer (and CLIP-L, for files that
    train it) for this and later calls ([] takes them off; None leaves the models as they are); what is on
    is recorded in settings["loras"].
    """
    models = models or FluxModels(transformer, autoencoder, text_encoders)
    if models.transformer is None or models.text_encoders is None or (decode and models.autoencoder is None):
        raise ValueError("generate needs a transformer, text encoders and (to decode) an autoencoder")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a string or a non-empty list of strings")
    presets.check_range("num_inference_steps", num_inference_steps, presets.STEPS_RANGE)
    presets.check_range("guidance", guidance, presets.GUIDANCE_RANGE)
    cache_config = speed_presets.step_cache_config(speed_mode)  # validates the name
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer; got {num_images!r}")
    if width is None and height is None:
        width, height = presets.dimensions(aspect_ratio, image_size)
    elif width is None or height is None:
        raise ValueError("give both width and height, or neither")
    else:
        width, height = (max(16, v - v % 16) for v in (width, height))

    base_seed = resolve_seed(seed)
    seeds = [base_seed + i for p in prompts for i in range(num_images)]
    all_prompts = [p for p in prompts for _ in range(num_images)]
    model = models.transformer
    device, dtype = model.device, model.dtype
    timings: dict[str, float] = {}

    if loras is not None:  # before encoding: a LoRA may train CLIP-L too
        use_loras(model, loras, clip=getattr(models.text_encoders, "clip", None))
    start = time.perf_counter()
    memory = getattr(models, "memory", None)
    with memory.encoding() if memory else contextlib.nullcontext():
        txt, vec = models.text_encoders.encode(prompts)
    txt = txt.to(device, dtype).repeat_interleave(num_images, dim=0)
    vec = vec.to(device, dtype).repeat_interleave(num_images, dim=0)
    timings["encode_s"] = time.perf_counter() - start

    if initial_noise is None:
        noise = torch.cat([sampling.get_noise(1, height, width, device, dtype, s) for s in seeds])
    else:
        expected = (len(seeds), sampling.LATENT_CHANNELS, *sampling.latent_size(height, width))
        if tuple(initial_noise.shape) != expected:
            raise ValueError(f"initial_noise must have shape {list(expected)}; got {list(initial_noise.shape)}")
        noise = initial_noise.to(device, dtype)
    inputs = sampling.prepare(noise, txt, vec)
    timesteps = sampling.get_schedule(num_inference_steps, inputs["img"].shape[1], shift=True)

    acceleration = _accelerate(model, speed_mode, memory)
    start = time.perf_counter()
    if cache_config is None:
        runner = _CountingModel(model)
    else:
        runner = StepCache(model, cache_config, num_steps=num_inference_steps)
    packed = sampling.denoise(runner, **inputs, timesteps=timesteps, guidance=guidance, callback=callback)
    evaluations = runner.calls if cache_config is None else runner.full_evaluations
    timings["denoise_s"] = time.perf_counter() - start
    latents = sampling.unpack(packed.float(), height, width)
    if memory:
        memory.after_denoise()

    images = []
    if decode:
        start = time.perf_counter()
        ae = models.autoencoder
        ae_param = next(ae.parameters())
        if memory:  # image by image, tiled when a whole decode does not fit
            pixels = memory.decode(ae, latents)
        else:
            pixels = ae.decode(latents.to(ae_param.device, ae_param.dtype))
        images = latents_to_images(pixels)
        timings["decode_s"] = time.perf_counter() - start
    timings["total_s"] = sum(timings.values())
    settings = {"aspect_ratio": aspect_ratio, "image_size": image_size, "width": width, "height": height,
                "num_inference_steps": num_inference_steps, "guidance": guidance, "seed": base_seed,
                "speed_mode": speed_presets.resolve(speed_mode).name if cache_config else speed_presets.OFF}
    if cache_config is not None:
        settings["step_cache"] = runner.summary()
    if acceleration is not None:
        settings["acceleration"] = acceleration.summary()
    applied = applied_loras(model)
    if applied:
        settings["loras"] = applied
    if memory:
        settings["memory"] = memory.summary()
    return GenerationResult(images=images, seeds=seeds, prompts=all_prompts, width=width, height=height,
                            latents=latents, evaluations=evaluations, timings=timings, settings=settings)
