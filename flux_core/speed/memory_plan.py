"""Memory planning: given a device memory budget, decide what stays on the device and what streams.

A plan fixes four things, for a target image size:

* the transformer: every block resident, or the first `resident_blocks` (in execution order) resident and
  the rest streamed through two device slots (speed.offload.BlockStreamer);
* the T5 policy: "keep" (on the device for good), "offload" (in CPU memory; its blocks stream through the
  device while it encodes), "cpu" (runs on the CPU) or "free" (as offload, then dropped; the next prompt
  reloads it from its file);
* the VAE decode: whole, or in tiles of `vae_tile` latents when a whole decode cannot fit;
* the estimated device peak of each phase (encode, denoise, decode), checked against budget - reserve.

Estimates are tensor bytes, the quantity torch.cuda.max_memory_allocated reports. Activation factors
were measured, not guessed (see the constants). Everything here is arithmetic: no device is touched.
Budgets are in GiB (2**30 bytes), as nvidia-smi and torch count a card's memory.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

GIB = 2 ** 30
T5_POLICIES = ("keep", "offload", "cpu", "free")
OFFLOAD_MODES = ("none", "blocks", "auto")
DEFAULT_RESERVE_GIB = 0.75  # CUDA context (~0.3-0.5 GiB, outside torch's allocator) plus allocator slack
SLOTS = 2                   # device slots of a streamer: the block running and the one being copied

# Peak live activations of one transformer block, in units of (tokens x hidden x element size): measured
# with ru_maxrss at hidden 1024, 1280 tokens, fp32 and bf16: double 13-16, single 19. 24 adds the block's
# inputs held by the caller (2 units) and a margin for kernel workspaces.
TRANSFORMER_ACTIVATION_UNITS = 24
# Peak of a VAE decode in bytes per output pixel per element byte: 892 measured (FLUX widths, fp32,
# 256x256, ru_maxrss). Scales with pixels: the full-resolution 256- and 128-channel tensors dominate.
VAE_DECODE_BYTES_PER_PIXEL = 1000
MISC_BYTES = 64 * 2 ** 20   # latents, noise, text conditioning, rotary tables
TILE_CHOICES = (128, 96, 64, 48, 32)  # latent tile sides tried, largest first (x8 pixels)
TEXT_TOKENS = 512


@dataclass(frozen=True)
class PartSize:
    """Bytes of one model part: what never streams, and each streamable block in execution order."""

    fixed: int
    blocks: tuple[int, ...] = ()

    @property
    def total(self) -> int:
        return self.fixed + sum(self.blocks)

    @property
    def largest_block(self) -> int:
        return max(self.blocks, default=0)


@dataclass(frozen=True)
class ModelSizes:
    transformer: PartSize
    t5: PartSize
    clip: int
    autoencoder: int
    hidden_size: int = 3072
    t5_d_model: int = 4096
    t5_d_ff: int = 10240
    t5_heads: int = 64
    act_bytes: int = 2      # element size of transformer / T5 activations
    ae_act_bytes: int = 4   # element size of VAE activations


def tensor_bytes(module: torch.nn.Module, skip=lambda name: False) -> int:
    """Bytes of a module's parameters and buffers (meta tensors count as their real size)."""
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    return sum(t.numel() * t.element_size() for name, t in tensors if not skip(name))


def t5_rest(name: str) -> bool:
    """T5 tensors that do not stream with their block: block 0's position-bias table is read by the
    encoder before block 0 runs."""
    return "relative_attention_bias" in name


def sizes_of(transformer, t5, clip, autoencoder) -> ModelSizes:
    """Sizes of live (or meta) modules; t5/clip may be None (freed, or not loaded)."""
    blocks = list(transformer.double_blocks) + list(transformer.single_blocks)
    block_bytes = tuple(tensor_bytes(b) for b in blocks)
    tr = PartSize(tensor_bytes(transformer) - sum(block_bytes), block_bytes)
    if t5 is not None:
        t5_blocks = tuple(tensor_bytes(b, t5_rest) for b in t5.encoder.block)
        t5_part, cfg = PartSize(tensor_bytes(t5) - sum(t5_blocks), t5_blocks), t5.config
    else:
        t5_part, cfg = PartSize(0), None
    ae_param = next(autoencoder.parameters(), None)
    first = next(transformer.parameters())
    return ModelSizes(tr, t5_part, tensor_bytes(clip) if clip is not None else 0, tensor_bytes(autoencoder),
                      hidden_size=transformer.params.hidden_size,
                      t5_d_model=cfg.d_model if cfg else 4096, t5_d_ff=cfg.d_ff if cfg else 10240,
                      t5_heads=cfg.num_heads if cfg else 64,
                      act_bytes=first.element_size() if first.is_floating_point() else 2,
                      ae_act_bytes=ae_param.element_size() if ae_param is not None else 4)


def full_size(dtype: torch.dtype = torch.bfloat16, ae_dtype: torch.dtype = torch.float32) -> ModelSizes:
    """FLUX.1 [dev] 12B, T5-XXL, CLIP-L and the autoencoder, counted from models built on meta."""
    from ..autoencoder import FLUX_AE, AutoEncoder
    from ..model import FLUX_DEV, Flux
    from ..text_encoders.clip import CLIP_L, CLIPTextModel
    from ..text_encoders.t5 import T5_XXL, T5Encoder

    with torch.device("meta"):
        parts = (Flux(FLUX_DEV).to(dtype), T5Encoder(T5_XXL).to(dtype), CLIPTextModel(CLIP_L).to(dtype),
                 AutoEncoder(FLUX_AE).to(ae_dtype))
    return sizes_of(*parts)


# ------------------------------------------------------------------------------------------------
# activation estimates


def image_tokens(width: int, height: int) -> int:
    return (height // 16) * (width // 16)


def transformer_activations(sizes: ModelSizes, width: int, height: int, batch: int = 1) -> int:
    tokens = TEXT_TOKENS + image_tokens(width, height)
    return TRANSFORMER_ACTIVATION_UNITS * batch * tokens * sizes.hidden_size * sizes.act_bytes


def t5_activations(sizes: ModelSizes, batch: int = 1) -> int:
    n, e = TEXT_TOKENS, sizes.act_bytes
    bias = sizes.t5_heads * n * n * (4 + e)  # the fp32 position bias and its copy in the compute dtype
    return batch * (bias + 4 * n * sizes.t5_d_ff * e + 8 * n * sizes.t5_d_model * e)


def vae_decode_bytes(width: int, height: int, element_size: int) -> int:
    """Peak activations of decoding one image at a time (the memory-managed pipeline decodes image by image)."""
    return VAE_DECODE_BYTES_PER_PIXEL * width * height * element_size


def vae_decode_activations(sizes: ModelSizes, width: int, height: int) -> int:
    return vae_decode_bytes(width, height, sizes.ae_act_bytes)


def tiled_decode_activations(sizes: ModelSizes, width: int, height: int, tile: int) -> int:
    """A tile of `tile` latents a side (8x the pixels), plus the float32 image and weight accumulators."""
    side = tile * 8
    return vae_decode_activations(sizes, min(side, width), min(side, height)) + 4 * 4 * width * height


# ------------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class MemoryPlan:
    budget_gib: float | None
    reserve_gib: float
    width: int
    height: int
    total_blocks: int
    resident_blocks: int
    t5_policy: str
    vae_tile: int | None
    phases: dict = field(default_factory=dict)   # phase -> estimated device bytes
    host_bytes: int = 0                          # weights kept in CPU memory (pinned on CUDA)
    fits: bool = True
    notes: tuple = ()

    @property
    def stream_blocks(self) -> bool:
        return self.resident_blocks < self.total_blocks

    @property
    def all_resident(self) -> bool:
        """Everything lives on the device: the parts can be loaded straight there."""
        return not self.stream_blocks and self.t5_policy == "keep"

    @property
    def streamed_blocks(self) -> int:
        return self.total_blocks - self.resident_blocks

    @property
    def peak_bytes(self) -> int:
        return max(self.phases.values(), default=0)

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(peak_gib=round(self.peak_bytes / GIB, 2), stream_blocks=self.stream_blocks,
                   phases_gib={k: round(v / GIB, 2) for k, v in self.phases.items()})
        del out["phases"]
        return out

    def describe(self) -> str:
        budget = "no budget" if self.budget_gib is None else \
            f"{self.budget_gib:g} GiB budget ({self.reserve_gib:g} GiB reserved)"
        blocks = (f"{self.streamed_blocks} of {self.total_blocks} transformer blocks streamed "
                  f"({self.resident_blocks} resident)") if self.stream_blocks else "transformer resident"
        t5 = {"keep": "T5 kept on the device", "offload": "T5 in CPU memory, streamed for encoding",
              "cpu": "T5 runs on the CPU", "free": "T5 streamed for encoding, then freed"}[self.t5_policy]
        vae = "VAE decode whole" if self.vae_tile is None else f"VAE decode in {self.vae_tile * 8}px tiles"
        phases = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.phases.items())
        verdict = "" if self.fits else " DOES NOT FIT"
        lines = [f"memory plan for {self.width}x{self.height}, {budget}: {blocks}; {t5}; {vae}.",
                 f"estimated device peak {self.peak_bytes / GIB:.2f} GiB ({phases}){verdict}; "
                 f"CPU memory for offloaded weights {self.host_bytes / GIB:.1f} GiB."]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _phases(s: ModelSizes, k: int, t5_policy: str, tile, width, height, batch, prefix) -> dict:
    n = len(s.transformer.blocks)
    resident = s.transformer.fixed + prefix[k] + s.clip + s.autoencoder + MISC_BYTES
    if t5_policy == "keep":
        resident += s.t5.total
        encode = t5_activations(s, batch)
    elif t5_policy in ("offload", "free"):
        encode = s.t5.fixed + SLOTS * s.t5.largest_block + t5_activations(s, batch)
    else:
        encode = 0
    slots = SLOTS * s.transformer.largest_block if k < n else 0
    decode = (vae_decode_activations(s, width, height) if tile is None
              else tiled_decode_activations(s, width, height, tile))
    # the transformer's slots are released after denoising, so they do not meet encoding or decoding
    return {"encode": resident + encode,
            "denoise": resident + slots + transformer_activations(s, width, height, batch),
            "decode": resident + decode}


def plan_memory(sizes: ModelSizes, budget_gib: float | None = None, *, width: int = 1024, height: int = 1024,
                batch: int = 1, offload: str = "auto", t5_policy: str = "auto",
                reserve_gib: float = DEFAULT_RESERVE_GIB) -> MemoryPlan:
    """The plan with the most transformer blocks resident that fits budget_gib - reserve_gib.

    offload: "none" keeps every block resident; "blocks" streams (all of them without a budget, else as
    few as the budget allows); "auto" streams only when the budget needs it (never without a budget).
    t5_policy: one of T5_POLICIES, or "auto": keep when everything fits without streaming, else offload,
    else cpu. The VAE decode is tiled only when no whole decode fits at all.
    """
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}; got {offload!r}")
    if t5_policy not in T5_POLICIES + ("auto",):
        raise ValueError(f"t5_policy must be auto or one of {', '.join(T5_POLICIES)}; got {t5_policy!r}")
    if budget_gib is not None and budget_gib <= 0:
        raise ValueError(f"the memory budget must be positive; got {budget_gib!r} GiB")
    n = len(sizes.transformer.blocks)
    prefix = [0]
    for b in sizes.transformer.blocks:
        prefix.append(prefix[-1] + b)
    limit = math.inf if budget_gib is None else (budget_gib - reserve_gib) * GIB
    if offload == "none":
        ks = [n]
    elif offload == "blocks" and budget_gib is None:
        ks = [0]
    elif budget_gib is None:
        ks = [n]
    else:
        ks = list(range(n, -1, -1))
    t5_choices = [t5_policy] if t5_policy != "auto" else ["keep", "offload", "cpu"]
    tiles = (None,) + TILE_CHOICES

    def phases(k, t5p, tile):
        return _phases(sizes, k, t5p, tile, width, height, batch, prefix)

    chosen, notes = None, []
    for t5p in t5_choices:
        # "auto" keeps the T5 only when that costs no streaming at all
        allowed = [k for k in ks if k == n] if (t5_policy == "auto" and t5p == "keep") else ks
        for tile in tiles:
            k = next((k for k in allowed if max(phases(k, t5p, tile).values()) <= limit), None)
            if k is not None:
                chosen = (k, t5p, tile)
                break
        if chosen:
            break
    fits = chosen is not None
    if not fits:  # report the smallest configuration and say it does not fit
        t5p = t5_choices[-1] if t5_policy != "auto" else "cpu"
        k = min(ks)
        chosen = (k, t5p, None if phases(k, t5p, None)["decode"] <= limit else tiles[-1])
        notes.append("no configuration fits the budget; try quantized weights (fp8/GGUF), a smaller image "
                     "or a larger budget")
    k, t5p, tile = chosen
    if tile is not None:
        notes.append(f"a whole {width}x{height} decode does not fit; tiles are blended, so the image can "
                     "differ slightly from an untiled decode")
    offloaded = sizes.transformer.total - prefix[k] - sizes.transformer.fixed if k < n else 0
    host = offloaded + (sizes.t5.total if t5p in ("offload", "cpu", "free") else 0)
    return MemoryPlan(budget_gib=budget_gib, reserve_gib=reserve_gib, width=width, height=height,
                      total_blocks=n, resident_blocks=k, t5_policy=t5p, vae_tile=tile,
                      phases=phases(k, t5p, tile), host_bytes=host, fits=fits, notes=tuple(notes))


def device_budget_gib(device) -> float | None:
    """Total memory of a CUDA device in GiB (None for other devices: nothing to plan)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(device).total_memory / GIB
