"""The T5 v1.1 encoder (FLUX uses T5-XXL), with the Hugging Face / ComfyUI parameter names.

Math: unscaled token embedding, pre-norm blocks with RMS norm (no mean, no bias), attention without the
1/sqrt(d) factor plus a bucketed relative-position bias that block 0 owns and every block reuses, a
gated tanh-GELU feed-forward, and a final RMS norm. No attention mask: FLUX attends to the padding too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class T5Config:
    d_model: int = 4096
    d_ff: int = 10240
    d_kv: int = 64
    num_heads: int = 64
    num_layers: int = 24
    vocab_size: int = 32128
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv


T5_XXL = T5Config()
# Tiny random T5 for tests and demo mode; d_model is the transformer's context_in_dim.
TINY_T5 = T5Config(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2)


class RMSNorm(nn.Module):
    """T5's layer norm: scale by the root mean square, computed in fp32 so bf16/fp16 do not lose it."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        x = (x.float() * torch.rsqrt(var + self.eps)).to(self.weight.dtype)
        return self.weight * x


def relative_position_bucket(rel: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bidirectional buckets: half for keys after the query; exact for small distances, log-spaced beyond."""
    half = num_buckets // 2
    bucket = (rel > 0).long() * half
    n = rel.abs()
    exact = half // 2
    # log of 0 is never used (those n are exact), clamp only to keep the arithmetic finite
    far = exact + (torch.log(n.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                   * (half - exact)).long()
    far = far.clamp(max=half - 1)
    return bucket + torch.where(n < exact, n, far)


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.cfg = cfg
        inner = cfg.inner_dim
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, cfg.num_heads)

    def position_bias(self, length: int, device) -> Tensor:
        """(1, heads, length, length) additive bias; bias[h, i, j] depends on j - i."""
        pos = torch.arange(length, device=device)
        rel = pos[None, :] - pos[:, None]
        buckets = relative_position_bucket(rel, self.cfg.num_buckets, self.cfg.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        b, n, _ = x.shape
        h, d = self.cfg.num_heads, self.cfg.d_kv
        q, k, v = (lin(x).view(b, n, h, d).transpose(1, 2) for lin in (self.q, self.k, self.v))
        # T5 folds the usual 1/sqrt(d) into its weights, hence scale=1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, n, h * d))


class T5SelfAttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_bias)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.eps)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5GatedFeedForward(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        # wo may be kept in fp32 for fp16 runs (its activations overflow fp16 in T5-XXL)
        return self.wo(h.to(self.wo.weight.dtype)).to(x.dtype)


class T5FeedForwardLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5GatedFeedForward(cfg)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.eps)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


def _clamp_fp16(x: Tensor) -> Tensor:
    # fp16 residuals of T5-XXL can reach inf; clamping just below the limit keeps them finite
    if x.dtype == torch.float16:
        limit = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-limit, limit)
    return x


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5SelfAttentionLayer(cfg, has_relative_bias), T5FeedForwardLayer(cfg)])

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = _clamp_fp16(self.layer[0](x, bias))
        return _clamp_fp16(self.layer[1](x))


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.block = nn.ModuleList([T5Block(cfg, has_relative_bias=(i == 0)) for i in range(cfg.num_layers)])
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.eps)


class T5Encoder(nn.Module):
    """input_ids (B, L) -> last hidden state (B, L, d_model)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.shared.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.shared.weight.device

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.shared(input_ids)
        blocks = self.encoder.block
        bias = blocks[0].layer[0].SelfAttention.position_bias(input_ids.shape[1], input_ids.device)
        for block in blocks:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)
