"""fp8 (e4m3) matmuls with per-row scales for the linear layers inside the transformer blocks.

The scheme (row-wise dynamic scaling):
* weight W (N, K), once: per output row n, s_w[n] = max|W[n, :]| / 448 and W8 = e4m3(W / s_w);
* activation X (M, K), every call: per token m, s_x[m] = max|X[m, :]| / 448 and X8 = e4m3(X / s_x);
* Y = (X8 @ W8^T) * s_x[:, None] * s_w[None, :] + b, accumulated in float32, written as bf16.

torch._scaled_mm computes exactly Y with scale_a = s_x (M, 1) and scale_b = s_w (1, N) on GPUs with fp8
tensor cores (compute capability 8.9: Ada, 9.0: Hopper, and newer). A per-row scale keeps one outlier row
or token from flattening the resolution of all the others, which a single per-tensor scale would do.
`emulate` is the same formula in float32 (for tests on any machine).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from ..quant.rowwise import FP8_DTYPE, FP8_MAX, quantize_rows

E4M3, E4M3_MAX = FP8_DTYPE, FP8_MAX  # float8_e4m3fn and its largest finite value
MIN_CAPABILITY = (8, 9)
_TINY = 1e-12  # all-zero rows get this scale instead of 0 (their quantized values are 0 either way)


def quantize_activations(x: Tensor) -> tuple[Tensor, Tensor]:
    """(e4m3 values, float32 scales (rows, 1)) for a (rows, K) tensor, one scale per row, saturating. The
    per-call path: one fused pass, no chunking (weights are quantized once, by quant.rowwise.quantize_rows)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(_TINY) / E4M3_MAX
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def emulate(xq: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor, bias: Tensor | None, out_dtype) -> Tensor:
    """The scaled fp8 matmul in float32: (xq * s_x) @ (wq * s_w)^T + b. w_scale is (1, N) or (N, 1)."""
    out = (xq.float() @ wq.float().t()) * x_scale * w_scale.reshape(1, -1)
    return (out if bias is None else out + bias.float()).to(out_dtype)


def scaled_mm(xq: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor, bias: Tensor | None, out_dtype,
              fast_accum: bool = True) -> Tensor:
    """torch._scaled_mm with row-wise scales; wq is (N, K) row-major, so wq.t() is the column-major B it wants."""
    return torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale.reshape(1, -1), bias=bias,
                            out_dtype=out_dtype, use_fast_accum=fast_accum)


@functools.lru_cache(maxsize=None)
def scaled_mm_probe(device: str) -> str | None:
    """Run one small row-wise scaled matmul with a bias on the device: None if it works, else the error."""
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(16, 32, device=device, generator=gen, dtype=torch.bfloat16)
        w = torch.randn(48, 32, device=device, generator=gen, dtype=torch.bfloat16)
        (xq, xs), (wq, ws) = quantize_activations(x), quantize_rows(w, "fp8")
        got = scaled_mm(xq, xs, wq, ws, torch.zeros(48, device=device, dtype=torch.bfloat16), torch.bfloat16)
        want = emulate(xq, xs, wq, ws, None, torch.float32)
        if not torch.allclose(got.float(), want, rtol=2e-2, atol=2e-2):
            return "the row-wise scaled fp8 matmul gave wrong numbers on this GPU / PyTorch"
    except (RuntimeError, TypeError, NotImplementedError) as error:
        return f"row-wise scaled fp8 matmul is not available here ({str(error).splitlines()[0][:160]})"
    return None


def fp8_unsupported(device, dtype: torch.dtype) -> str | None:
    """Why fp8 matmuls cannot run on this device for this model dtype, or None when they can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"fp8 matmuls need a CUDA GPU of compute capability 8.9 or newer (this is {device.type})"
    if dtype != torch.bfloat16:
        return f"row-wise scaled fp8 matmuls write bf16; the model is {str(dtype).replace('torch.', '')}"
    if not hasattr(torch, "_scaled_mm"):
        return "this PyTorch has no torch._scaled_mm"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (f"this GPU is compute capability {capability[0]}.{capability[1]}; fp8 tensor cores need 8.9 (Ada) "
                f"or newer, and emulating them would be slower than bf16")
    index = device.index if device.index is not None else torch.cuda.current_device()
    return scaled_mm_probe(f"cuda:{index}")


class Fp8Linear(nn.Linear):
    """nn.Linear holding e4m3 weights with per-output-row scales (`weight_scale`, float32 (N,)).

    Made in place from an nn.Linear by `to_fp8`; the bf16 weight is released. Runs on any device that has
    torch._scaled_mm (CPU included, slowly: tests use that to check the call against `emulate`)."""

    out_dtype = torch.bfloat16
    fast_accum = True

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        xq, xs = quantize_activations(rows)
        bias = None if self.bias is None else self.bias.to(self.out_dtype)
        out = scaled_mm(xq, xs, self.weight, self.weight_scale, bias, self.out_dtype, self.fast_accum)
        return out.reshape(*x.shape[:-1], -1)


@torch.no_grad()
def to_fp8(linear: nn.Linear) -> Fp8Linear:
    """Quantize one nn.Linear in place (weight -> e4m3 + row scales) and return it, now an Fp8Linear."""
    if linear.in_features % 16 or linear.out_features % 16:
        raise ValueError(f"fp8 matmuls need both sizes divisible by 16; got {linear.in_features}x{linear.out_features}")
    wq, scale = quantize_rows(linear.weight, "fp8")
    linear.weight = nn.Parameter(wq, requires_grad=False)
    linear.register_buffer("weight_scale", scale.reshape(-1))
    linear.__class__ = Fp8Linear
    return linear


def block_linears(model) -> list[nn.Linear]:
    """The large per-token linears of a flux_core Flux: q/k/v, projections and MLPs of every block (the
    modulation layers see one row per image and stay in bf16, as do the embedders and the final layer)."""
    found = []
    for block in model.double_blocks:
        for stream in ("img", "txt"):
            attn, mlp = getattr(block, f"{stream}_attn"), getattr(block, f"{stream}_mlp")
            found += [attn.qkv, attn.proj, mlp[0], mlp[2]]
    for block in model.single_blocks:
        found += [block.linear1, block.linear2]
    return found


def quantize_model(model) -> int:
    """Every plain nn.Linear among the block linears of `model` to fp8 (see block_linears); returns how many.
    Layers the loader already stores quantized (flux_core.quant) are left as they are."""
    count = 0
    for linear in block_linears(model):
        if type(linear) is nn.Linear:
            to_fp8(linear)
            count += 1
    return count


def has_plain_block_linears(model) -> bool:
    return any(type(linear) is nn.Linear for linear in block_linears(model))
