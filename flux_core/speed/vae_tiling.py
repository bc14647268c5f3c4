"""Tiled VAE decoding: bounded memory for large images, used only when a whole decode does not fit.

The latent is cut into overlapping square tiles; each is decoded alone and the pixel tiles are blended
with weights that ramp linearly across each overlap (weight 1 where only one tile covers a pixel), so
there is no hard seam. The decoder's group norms and middle attention see one tile at a time, so the
result differs slightly from a whole decode; that is why the planner tiles only when it must.
"""
from __future__ import annotations

import torch
from torch import Tensor


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering 0..length with tiles of `tile` overlapping by at least `overlap`."""
    if tile >= length:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in 0..{tile - 1}; got {overlap}")
    starts = list(range(0, length - tile, tile - overlap))
    return starts + [length - tile]


def _ramp(length: int, lead: int, trail: int, device) -> Tensor:
    """1 in the middle, rising over `lead` samples at the start and falling over `trail` at the end."""
    w = torch.ones(length, device=device)
    if lead:
        w[:lead] = (torch.arange(lead, device=device) + 0.5) / lead
    if trail:
        w[length - trail:] = torch.minimum(w[length - trail:],
                                           (torch.arange(trail, 0, -1, device=device) - 0.5) / trail)
    return w


def _shared(starts: list[int], a: int, b: int, size: int) -> int:
    """Latents shared by tiles a and b (0 when either does not exist)."""
    if a < 0 or b >= len(starts):
        return 0
    return starts[a] + size - starts[b]


@torch.inference_mode()
def decode_tiled(ae, z: Tensor, tile: int = 64, overlap: int = 8) -> Tensor:
    """ae.decode(z) in tiles of tile x tile latents overlapping by `overlap` latents."""
    scale = ae.params.downscale
    b, _, h, w = z.shape
    rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    th, tw = min(tile, h), min(tile, w)
    out = weight = None
    for r, y0 in enumerate(rows):
        for c, x0 in enumerate(cols):
            pixels = ae.decode(z[:, :, y0:y0 + th, x0:x0 + tw]).float()
            if out is None:
                out = torch.zeros(b, pixels.shape[1], h * scale, w * scale, device=pixels.device)
                weight = torch.zeros(1, 1, h * scale, w * scale, device=pixels.device)
            # ramp only across the part shared with a neighbour tile
            wy = _ramp(th * scale, _shared(rows, r - 1, r, th) * scale, _shared(rows, r, r + 1, th) * scale,
                       pixels.device)
            wx = _ramp(tw * scale, _shared(cols, c - 1, c, tw) * scale, _shared(cols, c, c + 1, tw) * scale,
                       pixels.device)
            mask = wy[:, None] * wx[None, :]
            ys, xs = slice(y0 * scale, (y0 + th) * scale), slice(x0 * scale, (x0 + tw) * scale)
            out[:, :, ys, xs] += pixels * mask
            weight[:, :, ys, xs] += mask
            del pixels
    return (out / weight).to(next(ae.parameters()).dtype)
