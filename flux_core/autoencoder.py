"""The FLUX.1 autoencoder (16 latent channels, 8x downsampling), with the Black Forest Labs reference names.

Encoder and decoder are the LDM convolutional VAE: GroupNorm(32, eps 1e-6) + swish resnet blocks, one
single-head attention block in the middle, no quant convs. `encode` returns the scaled, shifted
posterior mean and `decode` undoes that scaling; images are in [-1, 1].
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class AutoEncoderParams:
    resolution: int = 256  # unused by the math; kept so configs read like the reference's
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for FLUX)."""
        return 2 ** (len(self.ch_mult) - 1)


FLUX_AE = AutoEncoderParams()
# Same depth and 8x downsampling as the real one, a few hundred kB of weights: for demos and tests.
TINY_AE = AutoEncoderParams(ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1, z_channels=16)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _swish(x: Tensor) -> Tensor:
    # Callers pass only fresh tensors (norm outputs); without autograd, activating in place saves one
    # full-resolution activation, which is what bounds memory when decoding large images.
    return F.silu(x, inplace=not torch.is_grad_enabled())


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        # One step per line so each intermediate is freed as soon as the next one exists.
        h = _swish(self.norm1(x))
        h = self.conv1(h)
        h = _swish(self.norm2(h))
        h = self.conv2(h)
        skip = self.nin_shortcut(x) if self.in_channels != self.out_channels else x
        return skip + h if torch.is_grad_enabled() else h.add_(skip)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1 convolutions as projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)
        # (b, c, h, w) -> (b, 1, h*w, c): one head whose size is the channel count. Contiguous, because
        # SDPA takes its fused kernel only then; a strided view falls back to the math path, which
        # materialises the (h*w)^2 score matrix: 2 GB more at 1024x1024 pixels.
        q, k, v = (proj(normed).reshape(b, 1, c, h * w).transpose(2, 3).contiguous()
                   for proj in (self.q, self.k, self.v))
        del normed
        out = F.scaled_dot_product_attention(q, k, v)
        del q, k, v
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Asymmetric padding (right and bottom only), as the reference: a symmetric pad shifts the grid.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = p.ch
        for level, mult in enumerate(p.ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(p.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, p.ch * mult))
                block_in = p.ch * mult
            if level != len(p.ch_mult) - 1:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)
        self.mid = MidBlock(block_in)
        self.norm_out = _norm(block_in)
        # Mean and log-variance of the posterior, stacked along channels.
        self.conv_out = nn.Conv2d(block_in, 2 * p.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x.to(self.conv_in.weight))
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        h = _swish(self.norm_out(h))
        return self.conv_out(h)


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        block_in = p.ch * p.ch_mult[-1]
        self.conv_in = nn.Conv2d(p.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in)
        # Built from the deepest level up, but indexed by level like the encoder: up[0] is full size.
        stages = []
        for level in reversed(range(len(p.ch_mult))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(p.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, p.ch * p.ch_mult[level]))
                block_in = p.ch * p.ch_mult[level]
            if level != 0:
                stage.upsample = Upsample(block_in)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, p.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z.to(self.conv_in.weight))
        h = self.mid(h)
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        h = _swish(self.norm_out(h))
        return self.conv_out(h)


class AutoEncoder(nn.Module):
    def __init__(self, params: AutoEncoderParams = FLUX_AE):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        self.scale_factor = params.scale_factor
        self.shift_factor = params.shift_factor

    def encode(self, x: Tensor) -> Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> latents (B, z_channels, H/8, W/8), scaled for the transformer."""
        mean, _logvar = self.encoder(x).chunk(2, dim=1)
        return self.scale_factor * (mean - self.shift_factor)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents -> images in roughly [-1, 1], in the weights' dtype."""
        return self.decoder(z / self.scale_factor + self.shift_factor)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))
