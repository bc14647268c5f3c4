"""The FLUX.1 rectified-flow transformer, with the Black Forest Labs reference parameter names.

Math follows the reference: joint attention with text tokens first, interleaved-pair rotary embedding
over three position axes, (shift, scale, gate) modulation and tanh-GELU MLPs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class FluxParams:
    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: list[int] = field(default_factory=lambda: [16, 56, 56])
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def variant(self) -> str:
        kind = {64: "", 128: "-canny/depth", 384: "-fill"}.get(self.in_channels, f"-in{self.in_channels}")
        return ("dev" if self.guidance_embed else "schnell") + kind


FLUX_DEV = FluxParams()


def default_axes_dim(head_dim: int) -> list[int]:
    """Rotary split of a head: an eighth for the (unused in txt2img) index axis, the rest for rows and columns.

    For head_dim 128 this is the reference [16, 56, 56].
    """
    first = head_dim // 8
    rest = (head_dim - first) // 2
    if first % 2 or rest % 2 or first + 2 * rest != head_dim:
        raise ValueError(f"cannot split head_dim {head_dim} into even rotary axes; pass axes_dim explicitly")
    return [first, rest, rest]


# ----------------------------------------------------------------------------------------------------
# Embeddings


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10_000, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of t*1000, cosines first, as the reference (t keeps its dtype before scaling)."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb.to(t.dtype) if torch.is_floating_point(t) else emb


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation matrices (B, N, dim/2, 2, 2) in float32 for positions along one axis."""
    cos, sin = _rope_cos_sin(pos, dim, theta)
    return torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2))


def _rope_cos_sin(pos: Tensor, dim: int, theta: int) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles (B, N, dim/2): computed wide, then rounded to float32 once."""
    wide = torch.float32 if pos.device.type == "mps" else torch.float64  # MPS has no float64
    scale = torch.arange(0, dim, 2, dtype=wide, device=pos.device) / dim
    angles = pos.to(wide)[..., None] * (1.0 / theta ** scale)
    return torch.cos(angles).float(), torch.sin(angles).float()


def embed_positions(ids: Tensor, axes_dim: list[int], theta: int) -> Tensor:
    """Rotary matrices for (B, N, n_axes) ids, concatenated over axes: (B, 1, N, head_dim/2, 2, 2)."""
    return torch.cat([rope(ids[..., i], d, theta) for i, d in enumerate(axes_dim)], dim=-3).unsqueeze(1)


def rope_factors(ids: Tensor, axes_dim: list[int], theta: int) -> Tensor:
    """The same rotations as (cos, sin) pairs: (B, 1, N, head_dim/2, 2) float32, half the size of the matrices.

    Rotating a pair (x0, x1) by the reference matrix [[cos, -sin], [sin, cos]] is the complex product
    (x0 + i x1)(cos + i sin): eagerly one vectorised complex multiply instead of four broadcast ones (5x
    faster on a CPU); compiled, the same products in real arithmetic (inductor has no complex kernels).
    MPS lacks some complex kernels, so there the reference matrices are kept."""
    if ids.device.type == "mps":
        return embed_positions(ids, axes_dim, theta)
    parts = [_rope_cos_sin(ids[..., i], d, theta) for i, d in enumerate(axes_dim)]
    cos, sin = torch.cat([c for c, _ in parts], -1), torch.cat([s for _, s in parts], -1)
    return torch.stack((cos, sin), dim=-1).unsqueeze(1)


def _is_cos_sin(x: Tensor, pe: Tensor) -> bool:
    return pe.ndim == x.ndim + 1  # (B, 1, N, D/2, 2); the matrices have one more dimension


def _rotate_real(x: Tensor, pe: Tensor) -> Tensor:
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1, cos, sin = pairs[..., 0], pairs[..., 1], pe[..., 0], pe[..., 1]
    return torch.stack((cos * x0 - sin * x1, sin * x0 + cos * x1), dim=-1).flatten(-2)


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate adjacent pairs of x (B, H, L, D) by pe (either form above), in float32, cast back."""
    if _is_cos_sin(x, pe):
        if torch.compiler.is_compiling():
            return _rotate_real(x, pe).to(x.dtype)
        pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * torch.view_as_complex(pe)).flatten(-2).to(x.dtype)
    pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]
    return out.reshape(x.shape).to(x.dtype)


def _rope_(x: Tensor, pe: Tensor) -> Tensor:
    """apply_rope in place where x is a float32 buffer of ours (eager), else out of place."""
    if x.dtype != torch.float32 or not _is_cos_sin(x, pe) or torch.compiler.is_compiling():
        return apply_rope(x, pe)
    torch.view_as_complex(x.unflatten(-1, (-1, 2))).mul_(torch.view_as_complex(pe))
    return x


def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor, backend=sdpa) -> Tensor:
    """Rotary attention on (B, H, L, D); returns (B, L, H*D). backend(q, k, v) is the kernel (see speed.attention)."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    return backend(q, k, v).transpose(1, 2).flatten(2)


# ----------------------------------------------------------------------------------------------------
# Layers (reference names: in_layer/out_layer, query_norm/key_norm with .scale, lin, ...)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.scale

    def into(self, x: Tensor, out: Tensor) -> Tensor:
        """forward(x) written into `out` (a slice of a joint buffer, in the model dtype): same roundings."""
        xf = x.float()
        factor = xf.pow(2).mean(-1, keepdim=True).add_(1e-6).rsqrt_()
        if torch.compiler.is_compiling():  # dynamo cannot trace out= into a strided slice; inductor fuses this
            out.copy_(xf * factor)
        else:
            torch.mul(xf, factor, out=out)
        return out.mul_(self.scale)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)  # q, k and v in one matmul (diffusers runs three)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


def split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, L, 3*H*D) -> three (B, H, L, D) views, rows ordered [q | k | v], head-major within each."""
    b, length, _ = qkv.shape
    q, k, v = qkv.view(b, length, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


def joint_qk(streams: list[tuple[tuple[Tensor, Tensor, Tensor], QKNorm]], pe: Tensor) -> tuple[Tensor, Tensor]:
    """q and k of all streams (text first), each normalized by its own QKNorm and written straight into one
    joint buffer, then rotated in place: the reference's norm -> concatenate -> rope without the copies."""
    (q0, _, v0), _ = streams[0]
    length = sum(qkv[0].shape[2] for qkv, _ in streams)
    q = v0.new_empty(q0.shape[0], q0.shape[1], length, q0.shape[3])
    k = torch.empty_like(q)
    start = 0
    for (sq, sk, _), norm in streams:
        end = start + sq.shape[2]
        norm.query_norm.into(sq, q[:, :, start:end])
        norm.key_norm.into(sk, k[:, :, start:end])
        start = end
    return _rope_(q, pe), _rope_(k, pe)


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: Tensor) -> list[Tensor]:
        """(shift, scale, gate) chunks, twice for a double block."""
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


# The blocks are for inference: they work in place on their own intermediates (never on their inputs), which
# saves an allocation and a pass per step on a CPU; the results are the reference's, operation for operation.


def _layer_norm(x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return _layer_norm(x).mul_(1 + scale).add_(shift)  # (1 + scale) * norm(x) + shift


def _gated(residual: Tensor, gate: Tensor, out: Tensor) -> Tensor:
    return out.mul_(gate).add_(residual)  # residual + gate * out, in `out`


def _mlp(hidden: int, mlp_hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden))


def _run_mlp(mlp: nn.Sequential, x: Tensor) -> Tensor:
    return mlp[2](torch.ops.aten.gelu_(mlp[0](x), approximate="tanh"))


class DoubleStreamBlock(nn.Module):
    attn_backend = staticmethod(sdpa)  # (q, k, v) -> out, all (B, H, L, D); speed.attention may set another

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_hidden = int(hidden * mlp_ratio)
        self.num_heads = num_heads
        self.img_mod = Modulation(hidden, double=True)
        self.img_attn = SelfAttention(hidden, num_heads, qkv_bias)
        self.img_mlp = _mlp(hidden, mlp_hidden)
        self.txt_mod = Modulation(hidden, double=True)
        self.txt_attn = SelfAttention(hidden, num_heads, qkv_bias)
        self.txt_mlp = _mlp(hidden, mlp_hidden)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)
        t_qkv = split_heads(self.txt_attn.qkv(_modulate(txt, t_shift1, t_scale1)), self.num_heads)
        i_qkv = split_heads(self.img_attn.qkv(_modulate(img, i_shift1, i_scale1)), self.num_heads)
        q, k = joint_qk([(t_qkv, self.txt_attn.norm), (i_qkv, self.img_attn.norm)], pe)
        attn = self.attn_backend(q, k, torch.cat((t_qkv[2], i_qkv[2]), 2)).transpose(1, 2).flatten(2)
        txt_len = txt.shape[1]
        img = _gated(img, i_gate1, self.img_attn.proj(attn[:, txt_len:]))
        img = _gated(img, i_gate2, _run_mlp(self.img_mlp, _modulate(img, i_shift2, i_scale2)))
        txt = _gated(txt, t_gate1, self.txt_attn.proj(attn[:, :txt_len]))
        txt = _gated(txt, t_gate2, _run_mlp(self.txt_mlp, _modulate(txt, t_shift2, t_scale2)))
        return img, txt


class SingleStreamBlock(nn.Module):
    attn_backend = staticmethod(sdpa)

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden, self.num_heads = hidden, num_heads
        self.mlp_hidden = int(hidden * mlp_ratio)
        self.linear1 = nn.Linear(hidden, hidden * 3 + self.mlp_hidden)  # q, k, v and the MLP input: one matmul
        self.linear2 = nn.Linear(hidden + self.mlp_hidden, hidden)
        self.norm = QKNorm(hidden // num_heads)
        self.modulation = Modulation(hidden, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        shift, scale, gate = self.modulation(vec)
        h = self.linear1(_modulate(x, shift, scale))  # (B, L, [q | k | v | mlp])
        qkv = split_heads(h[..., :3 * self.hidden], self.num_heads)
        q, k = joint_qk([(qkv, self.norm)], pe)
        attn = self.attn_backend(q, k, qkv[2]).transpose(1, 2).flatten(2)
        # linear2 reads [attention | gelu(mlp)]. Both are written into h's last columns (attention over v,
        # which is no longer needed), so the reference's concatenation is a view and not a copy.
        tail = h[..., 2 * self.hidden:]
        tail[..., :self.hidden].copy_(attn)
        torch.ops.aten.gelu_(tail[..., self.hidden:], approximate="tanh")
        # As 2-D rows (a view): a strided 3-D input sends F.linear to a slower path than addmm (0.62 s vs 0.42 s
        # at 1536 tokens x 7680 on a CPU). oneDNN's CPU bf16/fp16 matmul is slower on strided rows than a copy
        # plus a contiguous product (2.1 s vs 1.8 s), so those get the copy.
        rows = tail.flatten(0, 1)
        if rows.device.type == "cpu" and rows.dtype != torch.float32:
            rows = rows.contiguous()
        out = self.linear2(rows).unflatten(0, tail.shape[:2])
        return _gated(x, gate, out)


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear(_modulate(x, shift[:, None], scale[:, None]))


class Flux(nn.Module):
    """FLUX.1 transformer. forward(img, img_ids, txt, txt_ids, timesteps, y, guidance) -> velocity."""

    def __init__(self, params: FluxParams):
        super().__init__()
        if params.hidden_size % params.num_heads:
            raise ValueError(f"hidden_size {params.hidden_size} is not divisible by num_heads {params.num_heads}")
        if sum(params.axes_dim) != params.head_dim:
            raise ValueError(f"axes_dim {params.axes_dim} must sum to head_dim {params.head_dim}")
        self.params = params
        hidden = params.hidden_size
        self.img_in = nn.Linear(params.in_channels, hidden)
        self.time_in = MLPEmbedder(256, hidden)
        self.vector_in = MLPEmbedder(params.vec_in_dim, hidden)
        self.guidance_in = MLPEmbedder(256, hidden) if params.guidance_embed else None
        self.txt_in = nn.Linear(params.context_in_dim, hidden)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden, params.num_heads, params.mlp_ratio, params.qkv_bias) for _ in range(params.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden, params.num_heads, params.mlp_ratio) for _ in range(params.depth_single_blocks))
        self.final_layer = LastLayer(hidden, params.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.img_in.weight.device

    def embed_conditioning(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None) -> Tensor:
        vec = self.time_in(timestep_embedding(timesteps, 256))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this is a guidance-distilled (dev) model: pass a guidance value")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        return vec + self.vector_in(y)

    # forward = embed -> positions -> run_blocks -> final_layer. The parts are public so that step caching
    # (speed.caching) runs exactly this computation, split where it needs it, without a copy of the loop.

    def embed(self, img: Tensor, txt: Tensor, timesteps: Tensor, y: Tensor, guidance: Tensor | None = None):
        """(image tokens, text tokens, conditioning vector), all at the hidden width."""
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError("img and txt must be (batch, tokens, channels) tensors")
        return self.img_in(img), self.txt_in(txt), self.embed_conditioning(timesteps, y, guidance)

    def positions(self, img_ids: Tensor, txt_ids: Tensor) -> Tensor:
        """Rotary factors for the joint sequence (text first); the same for every step of a run."""
        return rope_factors(torch.cat((txt_ids, img_ids), dim=1), self.params.axes_dim, self.params.theta)

    def run_blocks(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, first_double: int = 0) -> Tensor:
        """Image tokens after the double blocks from `first_double` on and every single block."""
        for block in self.double_blocks[first_double:]:
            img, txt = block(img, txt, vec, pe)
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = block(x, vec, pe)
        return x[:, txt.shape[1]:]

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                guidance: Tensor | None = None) -> Tensor:
        img, txt, vec = self.embed(img, txt, timesteps, y, guidance)
        return self.final_layer(self.run_blocks(img, txt, vec, self.positions(img_ids, txt_ids)), vec)
