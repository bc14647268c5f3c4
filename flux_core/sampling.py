"""Flow-matching sampling as the reference does it: seeded noise, 2x2 packing, the resolution-dependent
time shift and Euler steps on the predicted velocity with the distilled guidance value fed to the model.

Convention: x_t = (1 - t) * x0 + t * noise, the model predicts v = noise - x0, t runs from 1 to 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

LATENT_CHANNELS = 16


def latent_size(height: int, width: int) -> tuple[int, int]:
    """Latent height/width (8x down, rounded up to whole 2x2 patches) for an image size."""
    return 2 * math.ceil(height / 16), 2 * math.ceil(width / 16)


def get_noise(num_samples: int, height: int, width: int, device, dtype: torch.dtype, seed: int) -> Tensor:
    """Unpacked latent noise (B, 16, H/8, W/8) from one seeded generator.

    Drawn on the CPU and then moved, so the same seed gives the same noise on every device.
    """
    h, w = latent_size(height, width)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    noise = torch.randn(num_samples, LATENT_CHANNELS, h, w, dtype=dtype, generator=generator)
    return noise.to(device)


def pack(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4), feature index c*4 + ph*2 + pw."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: Tensor, height: int, width: int) -> Tensor:
    """Inverse of pack for an image of height x width pixels."""
    h, w = latent_size(height, width)
    b, _, features = x.shape
    c = features // 4
    return x.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(batch: int, latent_h: int, latent_w: int, device=None) -> Tensor:
    """Position ids (B, h/2 * w/2, 3): axis 0 stays 0, axis 1 is the row, axis 2 the column."""
    ids = torch.zeros(latent_h // 2, latent_w // 2, 3, device=device)
    ids[..., 1] = torch.arange(latent_h // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(latent_w // 2, device=device)[None, :]
    return ids.reshape(1, -1, 3).repeat(batch, 1, 1)


def text_ids(batch: int, length: int, device=None) -> Tensor:
    return torch.zeros(batch, length, 3, device=device)


def prepare(noise: Tensor, txt: Tensor, vec: Tensor) -> dict[str, Tensor]:
    """Packed image tokens with their ids and the text inputs, broadcast to the noise batch."""
    b, _, h, w = noise.shape
    if txt.shape[0] == 1 and b > 1:
        txt, vec = txt.expand(b, -1, -1), vec.expand(b, -1)
    return {
        "img": pack(noise),
        "img_ids": image_ids(b, h, w, device=noise.device),
        "txt": txt,
        "txt_ids": text_ids(b, txt.shape[1], device=txt.device),
        "vec": vec,
    }


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_lin_function(x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15) -> Callable[[float], float]:
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: m * x + b


def get_schedule(num_steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15,
                 shift: bool = True) -> list[float]:
    """num_steps + 1 times from 1 to 0, shifted towards high noise for larger images."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    timesteps = torch.linspace(1, 0, num_steps + 1)
    if shift:
        mu = get_lin_function(y1=base_shift, y2=max_shift)(image_seq_len)
        timesteps = time_shift(mu, 1.0, timesteps)
    return timesteps.tolist()


@dataclass
class StepInfo:
    """What a per-step callback sees: progress, the current latent and the model's prediction."""

    step: int          # 1-based index of the step just taken
    total: int
    t_curr: float
    t_prev: float
    img: Tensor        # packed latent after this step
    pred: Tensor       # predicted velocity at t_curr

    def denoised(self) -> Tensor:
        """The model's current estimate of the clean latent (packed), for previews."""
        return self.img - self.t_prev * self.pred


def denoise(model, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, vec: Tensor,
            timesteps: list[float], guidance: float = 4.0,
            callback: Callable[[StepInfo], None] | None = None) -> Tensor:
    """Euler integration of the velocity from timesteps[0] to timesteps[-1].

    The state stays in img's dtype and t and guidance are given to the model in that dtype, as the
    reference does. `callback` runs after every step; raising from it cancels sampling.
    """
    guidance_vec = torch.full((img.shape[0],), guidance, device=img.device, dtype=img.dtype)
    total = len(timesteps) - 1
    for i, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        t_vec = torch.full((img.shape[0],), t_curr, dtype=img.dtype, device=img.device)
        pred = model(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, y=vec, timesteps=t_vec,
                     guidance=guidance_vec)
        img = img + (t_prev - t_curr) * pred
        if callback is not None:
            callback(StepInfo(i + 1, total, t_curr, t_prev, img, pred))
    return img
