"""Putting a loaded pipeline on one device by a MemoryPlan, and the T5 policy around text encoding.

    models = load_models(..., device="cpu")                      # weights in CPU memory first
    plan = plan_memory(sizes_of(...), budget_gib=8)
    memory = MemoryManager(models, "cuda", plan, t5_loader=...)
    with memory.encoding():  txt, vec = models.text_encoders.encode(prompts)
    ... denoise ...;  memory.after_denoise();  pixels = memory.decode(models.autoencoder, latents)

pipeline.load_models(offload=..., vram_budget_gb=..., t5_policy=...) does all of this.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

from .memory_plan import GIB, MemoryPlan, device_budget_gib, plan_memory, sizes_of, vae_decode_bytes
from .offload import BlockStreamer, stream_t5, stream_transformer
from .vae_tiling import decode_tiled


def _plan(sizes, device, budget_gib, **kw) -> MemoryPlan:
    """budget_gib None: the CUDA device's whole memory (no budget on other devices)."""
    return plan_memory(sizes, budget_gib if budget_gib is not None else device_budget_gib(device), **kw)


def _empty_host_cache() -> None:
    # freed pinned buffers go back to torch's pinned-memory cache, not to the system, until it is emptied
    empty = getattr(torch._C, "_host_emptyCache", None)
    if torch.cuda.is_available() and empty is not None:
        empty()


def manage_memory(models, device, *, offload: str = "auto", budget_gib: float | None = None,
                  t5_policy: str = "auto", width: int = 1024, height: int = 1024, batch: int = 1,
                  t5_loader: Callable | None = None, pin: bool | None = None) -> "MemoryManager":
    """Plan for the loaded models (in CPU memory) and place them. budget_gib None: the CUDA device's
    whole memory (no budget on other devices)."""
    encoders = models.text_encoders
    sizes = sizes_of(models.transformer, encoders.t5, encoders.clip, models.autoencoder)
    plan = _plan(sizes, device, budget_gib, offload=offload, t5_policy=t5_policy, width=width, height=height,
                 batch=batch)
    return MemoryManager(models, device, plan, t5_loader=t5_loader, pin=pin)


def plan_for_files(transformer, autoencoder, t5, clip, device, *, dtype: torch.dtype = torch.bfloat16,
                   ae_dtype: torch.dtype = torch.float32, offload: str = "auto", budget_gib: float | None = None,
                   t5_policy: str = "auto", width: int = 1024, height: int = 1024, batch: int = 1) -> MemoryPlan:
    """Plan before loading, from the files' headers (models built on meta), so that each part can be
    loaded straight to where it will live."""
    from ..loaders import part_plan

    metas = {}
    for part, path in (("transformer", transformer), ("autoencoder", autoencoder), ("t5", t5),
                       ("clip", clip if clip is not None else t5)):
        with part_plan(path, part, dtype) as load_plan:
            metas[part] = load_plan.module.to(ae_dtype if part == "autoencoder" else dtype)
    sizes = sizes_of(metas["transformer"], metas["t5"], metas["clip"], metas["autoencoder"])
    return _plan(sizes, device, budget_gib, offload=offload, t5_policy=t5_policy, width=width, height=height,
                 batch=batch)


class MemoryManager:
    """Owns where each part of a pipeline lives. t5_loader() -> T5Encoder on the CPU reloads a freed T5."""

    def __init__(self, models, device, plan: MemoryPlan, *, t5_loader: Callable | None = None,
                 pin: bool | None = None):
        self.models, self.device, self.plan = models, torch.device(device), plan
        self.t5_loader, self.pin = t5_loader, pin
        self.t5_loads = 0
        self.transformer_streamer: BlockStreamer | None = None
        self.t5_streamer: BlockStreamer | None = None
        if plan.t5_policy == "free" and t5_loader is None:
            raise ValueError("the 'free' T5 policy needs t5_loader to load the T5 again for the next prompt")
        self.transformer_streamer = stream_transformer(models.transformer, self.device, plan.resident_blocks, pin)
        models.autoencoder.to(self.device)
        encoders = models.text_encoders
        if encoders.clip is not None:
            encoders.move_clip(self.device)
        self._place_t5()

    # ---- T5 ---------------------------------------------------------------------------------------
    def _place_t5(self) -> None:
        encoders, policy = self.models.text_encoders, self.plan.t5_policy
        if encoders.t5 is None:
            return
        if policy == "keep":
            encoders.move_t5(self.device)
        elif policy == "cpu":
            encoders.move_t5("cpu")
        else:  # offload / free: blocks stream from CPU memory while encoding
            encoders.move_t5("cpu")
            self.t5_streamer = stream_t5(encoders.t5, self.device, self.pin)

    @contextmanager
    def encoding(self):
        """Wrap text encoding: reload a freed T5, bring the streamed T5's small parts to the device, and
        afterwards send them back (offload) or drop the T5 (free)."""
        encoders, policy = self.models.text_encoders, self.plan.t5_policy
        if encoders.t5 is None and policy == "free":
            with torch.inference_mode(False):  # normal tensors: generate() runs in inference mode
                encoders.t5 = self.t5_loader()
                self.t5_loads += 1
                self._place_t5()
        if self.t5_streamer is not None:
            self.t5_streamer.move_rest(encoders.t5, self.device)
        try:
            yield encoders
        finally:
            if self.t5_streamer is not None:
                self.t5_streamer.release()
                self.t5_streamer.move_rest(encoders.t5, "cpu")
            if policy == "free":
                if self.t5_streamer is not None:
                    self.t5_streamer.detach()
                self.t5_streamer = None
                encoders.free_t5()
                _empty_host_cache()

    # ---- transformer and decoding -----------------------------------------------------------------
    def after_denoise(self) -> None:
        """The transformer's slots are not needed while decoding (or encoding the next prompt)."""
        if self.transformer_streamer is not None:
            self.transformer_streamer.release()

    def decode_tile(self, width: int, height: int) -> int | None:
        """Tile size (latents) for decoding an image of this size: the plan's, or, for a size the plan was
        not made for, a whole decode when the device has room for it (CUDA only; elsewhere whole)."""
        if (width, height) == (self.plan.width, self.plan.height) or self.plan.budget_gib is None:
            return self.plan.vae_tile
        if self.device.type != "cuda":
            return self.plan.vae_tile
        element_size = next(self.models.autoencoder.parameters()).element_size()
        room = (self.plan.budget_gib - self.plan.reserve_gib) * GIB - torch.cuda.memory_allocated(self.device)
        return None if vae_decode_bytes(width, height, element_size) <= room else (self.plan.vae_tile or 64)

    def decode(self, ae, latents: torch.Tensor) -> torch.Tensor:
        """Decode image by image (whole or tiled, as planned); pixels in the autoencoder's dtype."""
        param = next(ae.parameters())
        scale = ae.params.downscale
        tile = self.decode_tile(latents.shape[-1] * scale, latents.shape[-2] * scale)
        latents = latents.to(param.device, param.dtype)
        if tile is None and self.plan.budget_gib is None:
            return ae.decode(latents)  # nothing to save memory for: decode the batch as the plain pipeline does
        out = []
        for z in latents.split(1):
            out.append(ae.decode(z) if tile is None else decode_tiled(ae, z, tile))
        return torch.cat(out)

    def summary(self) -> dict:
        """What was chosen (recorded with each image's settings); the full plan is self.plan."""
        plan = self.plan
        return {"budget_gib": plan.budget_gib, "streamed_blocks": plan.streamed_blocks,
                "t5_policy": plan.t5_policy, "vae_tile": plan.vae_tile,
                "estimated_peak_gib": round(plan.peak_bytes / GIB, 2)}
