"""Tiny random T5/CLIP text encoders from transformers (the oracle), written in every file layout we load.

Each writer returns the path it wrote and, where storage is lossy (fp16, bf16, fp8), the tensors exactly
as a correct loader must decode them, so parity can be checked tightly against the oracle run on those.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from flux_core.text_encoders import TINY_CLIP, TINY_T5, CLIPConfig, T5Config

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
# Linear weights ComfyUI's scaled-fp8 T5 files quantize with a per-tensor scale.
T5_LINEARS = ("SelfAttention.q.", "SelfAttention.k.", "SelfAttention.v.", "SelfAttention.o.",
              "DenseReluDense.wi_0.", "DenseReluDense.wi_1.", "DenseReluDense.wo.")


def _perturb(model, gen):
    """Make norms, biases and the position table non-trivial, so a swapped or dropped one shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_attention_bias" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif p.ndim == 1 and name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    return model


def hf_t5(cfg: T5Config = TINY_T5, seed: int = 0):
    import transformers

    hc = transformers.T5Config(d_model=cfg.d_model, d_ff=cfg.d_ff, d_kv=cfg.d_kv, num_heads=cfg.num_heads,
                               num_layers=cfg.num_layers, vocab_size=cfg.vocab_size,
                               relative_attention_num_buckets=cfg.num_buckets,
                               relative_attention_max_distance=cfg.max_distance, feed_forward_proj="gated-gelu",
                               dropout_rate=0.0, layer_norm_epsilon=cfg.eps)
    hc.dense_act_fn = "gelu_pytorch_tanh"
    torch.manual_seed(seed)
    model = transformers.T5EncoderModel(hc).eval()
    return _perturb(model, torch.Generator().manual_seed(seed + 1))


def hf_clip(cfg: CLIPConfig = TINY_CLIP, seed: int = 0):
    import transformers

    hc = transformers.CLIPTextConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                                     num_attention_heads=cfg.num_heads, num_hidden_layers=cfg.num_layers,
                                     vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_positions,
                                     hidden_act="quick_gelu", layer_norm_eps=cfg.eps, eos_token_id=49407,
                                     bos_token_id=49406, pad_token_id=49407, attention_dropout=0.0)
    hc._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(hc).eval()
    return _perturb(model, torch.Generator().manual_seed(seed + 1))


def t5_state(model) -> dict[str, torch.Tensor]:
    """HF T5 keys (shared.weight + encoder.*), untied copies, without encoder.embed_tokens."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
            if k != "encoder.embed_tokens.weight"}


def clip_state(model) -> dict[str, torch.Tensor]:
    """ComfyUI / HF 4.x CLIP keys: text_model.* (transformers 5 flattens them in memory)."""
    sd = model.state_dict()
    return {(k if k.startswith("text_model.") else "text_model." + k): v.detach().clone().contiguous()
            for k, v in sd.items()}


def run_hf_t5(model, sd: dict, ids: torch.Tensor) -> torch.Tensor:
    model.load_state_dict({**sd, "encoder.embed_tokens.weight": sd["shared.weight"]}, strict=True)
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def run_hf_clip(model, sd: dict, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = {k.removeprefix("text_model."): v for k, v in sd.items() if k.startswith("text_model.")}
    model.load_state_dict(flat, strict=True)
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.last_hidden_state, out.pooler_output


# --- storage transforms: (tensors to write, tensors a correct loader decodes) ---------------------------

def cast(sd: dict, dtype) -> tuple[dict, dict]:
    stored = {k: v.to(dtype) for k, v in sd.items()}
    return stored, {k: v.float() for k, v in stored.items()}


def plain_fp8(sd: dict) -> tuple[dict, dict]:
    """Every tensor stored as e4m3fn, norms and embeddings included (as in Comfy-Org's fp8 files)."""
    return cast(sd, FP8)


def scaled_fp8(sd: dict, spelling: str = "scale_weight", marker: str | None = "scaled_fp8",
               linears=T5_LINEARS) -> tuple[dict, dict]:
    """ComfyUI scaled fp8: linears as fp8 weight / per-tensor scale, the rest kept in fp16."""
    stored, decoded = {}, {}
    for k, v in sd.items():
        if k.endswith(".weight") and any(s in k for s in linears):
            scale = v.abs().max().float() / FP8_MAX
            q = (v / scale).to(FP8)
            stem = k[: -len("weight")]
            stored[k] = q
            stored[stem + spelling] = scale.reshape(())
            stored[stem + ("scale_input" if spelling == "scale_weight" else "input_scale")] = torch.tensor(1.0)
            if spelling == "weight_scale":  # newer ComfyUI also tags each layer
                stored[stem + "comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'),
                                                            dtype=torch.uint8)
            decoded[k] = q.float() * scale
        else:
            stored[k] = v.to(torch.float16)
            decoded[k] = stored[k].float()
    if marker:
        stored[marker] = torch.empty(0, dtype=FP8)
    return stored, decoded


# --- file layouts --------------------------------------------------------------------------------------

def save(tensors: dict, path: Path, metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def prefixed(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def all_in_one(t5_stored: dict, clip_stored: dict) -> dict:
    """A ComfyUI checkpoint: transformer, VAE and both encoders, with ComfyUI's extra keys."""
    out = {"model.diffusion_model.img_in.weight": torch.randn(8, 4),
           "vae.decoder.conv_in.weight": torch.randn(4, 4, 3, 3),
           "text_encoders.t5xxl.logit_scale": torch.tensor(4.6),
           "text_encoders.clip_l.logit_scale": torch.tensor(4.6),
           "text_encoders.clip_l.transformer.text_projection.weight": torch.randn(8, 8)}
    out.update(prefixed(t5_stored, "text_encoders.t5xxl.transformer."))
    out.update(prefixed(clip_stored, "text_encoders.clip_l.transformer."))
    return out


def sharded(tensors: dict, folder: Path, name: str = "model", shards: int = 2) -> Path:
    """An HF sharded folder: model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    keys = sorted(tensors)
    groups = [keys[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups, 1):
        fname = f"{name}-{i:05d}-of-{shards:05d}.safetensors"
        save({k: tensors[k] for k in group}, folder / fname)
        weight_map.update({k: fname for k in group})
    (folder / f"{name}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def diffusers_root(t5_stored: dict, clip_stored: dict, root: Path) -> Path:
    """A diffusers FLUX folder: text_encoder/ (one file), text_encoder_2/ (shards), model_index.json."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    save(clip_stored, root / "text_encoder" / "model.safetensors")
    sharded({**t5_stored, "encoder.embed_tokens.weight": t5_stored["shared.weight"].clone()},
            root / "text_encoder_2")
    return root
