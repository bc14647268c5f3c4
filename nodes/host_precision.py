"""fp8 matmuls for a speed mode on a host MODEL, from the weights the pack's loader already stores as fp8.

A MODEL loaded with weight_dtype fp8 (FLUX.1 Transformer Loader (Juiced)) holds its block linears packed:
e4m3 bytes plus one float32 scale per output row (quantized_ops.py), the weight format of the engine's row-
scaled fp8 matmuls (flux_core.speed.fp8_linear). Where the engine's plan for the mode says "fp8" on the
host's device and compute dtype, the speed node adds a DIFFUSION_MODEL wrapper (its own key) to its clone of
the MODEL; for the duration of each model call it lets the packed fp8 block linears (q/k/v, projections and
MLPs, as the engine picks them; the modulation linears see one row per image and stay as they are) run
``scaled_mm(quantize_activations(x), e4m3 weight, row scales)``. The weights themselves are not changed: the
input MODEL and any call outside the wrapper keep dequantizing them.

``FLUX_JUICED_FP8_MATMUL`` (auto | on | off, default auto): auto follows the engine's plan; on uses fp8
matmuls whenever the layers are packed fp8, the MODEL computes in bf16 and torch._scaled_mm works on the
device (a tiny probe call; on this PyTorch it does on a CPU too); off never does.
"""
from __future__ import annotations

import logging

import torch

from ..flux_core.speed import fp8_linear
from . import quantized_ops
from .switches import env_request

LOG = logging.getLogger("flux_juiced.speed")
ENV = "FLUX_JUICED_FP8_MATMUL"
KEY = "flux_juiced_fp8_matmul"  # DIFFUSION_MODEL wrapper key
LOAD_FP8 = "load with weight_dtype fp8 in FLUX.1 Transformer Loader (Juiced) to get fp8 matmuls"


def requested() -> str | None:
    """The request from FLUX_JUICED_FP8_MATMUL, or None to follow the speed mode."""
    return env_request(ENV)


def fp8_block_layers(model) -> list:
    """The packed fp8 block linears of the host FLUX inside `model` (a ModelPatcher), in module order."""
    return [module for module in model.get_model_object("diffusion_model").modules()
            if quantized_ops.is_fp8_block_linear(module)]


def _device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def why_not(layers: int, mode_name: str, mode_asks: bool, device, dtype, request: str = "auto") -> str | None:
    """Why fp8 matmuls are not used for `layers` packed fp8 block linears, or None when they are."""
    if request == "off":
        return f"{ENV}=off"
    if request == "auto" and not mode_asks:
        return f"{mode_name} does not ask for fp8 matmuls (it keeps the model's precision)"
    if not layers:
        return f"the MODEL has no packed fp8 block linears: {LOAD_FP8}"
    if request == "auto":
        return fp8_linear.fp8_unsupported(device, dtype)  # the engine's gate: GPU, dtype, a probe call
    if dtype != torch.bfloat16:
        return (f"the MODEL computes in {str(dtype).replace('torch.', '')}; the row-wise scaled fp8 matmuls take "
                f"and write bf16")
    if not hasattr(torch, "_scaled_mm"):
        return "this PyTorch has no torch._scaled_mm"
    return fp8_linear.scaled_mm_probe(_device_name(device))  # None when a small row-scaled matmul works there


def transformer_storage(speed_mode: str, device) -> str:
    """The weight_dtype the all-in-one node loads its transformer with for `speed_mode` on `device`: "fp8"
    where the mode would get fp8 matmuls there (the engine stores fp8-mode weights as e4m3 too), else
    "default". GPUs compute in bf16, the dtype the check assumes; the speed node re-checks on the loaded
    MODEL."""
    from ..flux_core.speed import presets

    mode = presets.resolve(speed_mode)
    request = requested() or "auto"
    if mode is None or request == "off" or (request == "auto" and mode.runtime.precision != "fp8"):
        return "default"
    if request == "on":
        return "fp8"
    return "fp8" if fp8_linear.fp8_unsupported(device, torch.bfloat16) is None else "default"


def _wrapper(device):
    # A plain function: ModelPatcher.clone() copies the wrapper lists, sharing the function.
    def fp8_matmuls(executor, *args, **kwargs):
        with quantized_ops.fp8_matmul_enabled(device):
            return executor(*args, **kwargs)
    return fp8_matmuls


def apply(model, mode, engine, device, dtype) -> dict:
    """Enable or not fp8 matmuls on `model` (a clone the node owns) for `mode` (presets.SpeedMode), given the
    engine's precision choice `engine` (precision.PrecisionChoice) for `device` and compute `dtype`; returns
    the summary entries (precision, precision_reason, fp8_layers, fp8_reason, fp8_request_from)."""
    from comfy.patcher_extension import WrappersMP

    request = requested()
    layers = fp8_block_layers(model)
    model.remove_wrappers_with_key(WrappersMP.DIFFUSION_MODEL, KEY)  # an earlier speed node's, if any
    why = why_not(len(layers), mode.name, mode.runtime.precision == "fp8", device, dtype, request or "auto")
    entries = {"fp8_request_from": ENV if request is not None else "speed mode", "engine_precision": engine.name}
    engine_says = f"The engine would use {engine.name}: {engine.reason}"
    if why is not None:
        return dict(entries, precision="comfyui", fp8_layers=0, fp8_reason=why,
                    precision_reason=(f"ComfyUI's own ops compute the linears (its fp8 options, such as --fast or "
                                      f"fp8 checkpoints, apply as configured); the speed node adds no fp8 matmuls: "
                                      f"{why}. {engine_says}"))
    model.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, KEY, _wrapper(torch.device(device)))
    source = f"{ENV}=on" if request == "on" else "the speed mode asks for them and this device has them"
    how = (f"fp8 e4m3 matmuls (torch._scaled_mm, per-token activation and per-row weight scales) straight from "
           f"the stored fp8 weights of {len(layers)} packed block linears, during each model call of this MODEL "
           f"({source})")
    return dict(entries, precision="fp8", fp8_layers=len(layers), fp8_reason=how,
                precision_reason=f"{how}; the other layers (modulation, embedders, final layer) run as loaded. "
                                     f"{engine_says}")
