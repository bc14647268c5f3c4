"""The CLIP text transformer (FLUX uses CLIP-L's), with the Hugging Face / ComfyUI parameter names.

Math: token plus learned position embeddings, pre-LN blocks with causal attention (scaled by
1/sqrt(head_dim)) and a quick-GELU MLP, a final LayerNorm. FLUX's pooled vector is the final hidden state
at the first end-of-text token, with no projection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HEAD_DIM = 64
EOS_ID = 49407


@dataclass(frozen=True)
class CLIPConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_heads: int = 12
    num_layers: int = 12
    vocab_size: int = 49408
    max_positions: int = 77
    eos_token_id: int = EOS_ID
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def heads_for(hidden_size: int) -> int:
    """Checkpoints do not store the head count; every CLIP text model uses 64-wide heads.

    Widths below 64 (tiny test models) get a single head. Tiny configs must follow this rule.
    """
    return max(1, hidden_size // HEAD_DIM)


CLIP_L = CLIPConfig()
# Tiny random CLIP for tests and demo mode; hidden_size is the transformer's vec_in_dim.
TINY_CLIP = CLIPConfig(hidden_size=64, intermediate_size=128, num_heads=heads_for(64), num_layers=2)


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(pos)[None]


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        h = self.num_heads
        q, k, v = (p(x).view(b, n, h, d // h).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # quick GELU, as CLIP was trained


class CLIPLayer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPLayer(cfg) for _ in range(cfg.num_layers)])


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)


class CLIPTextModel(nn.Module):
    """input_ids (B, L) -> (last hidden state (B, L, hidden), pooled (B, hidden))."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.embeddings.token_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text_model.embeddings.token_embedding.weight.device

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        tm = self.text_model
        x = tm.embeddings(input_ids)
        for layer in tm.encoder.layers:
            x = layer(x)
        x = tm.final_layer_norm(x)
        return x, x[torch.arange(x.shape[0], device=x.device), self.eos_positions(input_ids)]

    def eos_positions(self, input_ids: Tensor) -> Tensor:
        """Index of the first end-of-text token per row (padding repeats it).

        A row without one pools position 0, as transformers and ComfyUI do; our tokenizer always adds it.
        """
        return (input_ids == self.config.eos_token_id).int().argmax(dim=-1)
