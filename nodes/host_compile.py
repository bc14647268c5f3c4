"""A speed mode's runtime choices on a host MODEL: what the engine plans (flux_core.speed.runtime.plan) for the
host's device and dtype, and the part of it the host takes through a public extension point.

* compile: each double and single block is torch.compiled through ComfyUI's own helper
  ``comfy_api.torch_helpers.set_torch_compile_wrapper`` (an APPLY_MODEL wrapper that swaps the compiled
  blocks in for the duration of each model call). The step cache's block patches keep working on top: the
  host calls our patch, the patch calls the host's original block, which is then the compiled module.
* fp8 matmuls (host_precision.py): where the plan says fp8 and the MODEL's block linears are stored as
  packed fp8 (weight_dtype fp8 in this pack's loader), they run row-scaled fp8 matmuls from those weights
  during the model calls of the node's clone; otherwise ComfyUI's own ops compute them, and the summary says why.
* attention: the host's FLUX model runs ComfyUI's own attention, left as it is; the summary says what the
  engine would have used and why it is not applied here.

``FLUX_JUICED_COMPILE`` (auto | on | off, default auto) overrides the mode's compile request, e.g. "on" to
compile on a CPU, where "auto" stays eager (compile.py: measured no gain there).
"""
from __future__ import annotations

import dataclasses
import logging

from ..flux_core.speed import compile as comp
from ..flux_core.speed import runtime
from .switches import env_request

LOG = logging.getLogger("flux_juiced.speed")
ENV = "FLUX_JUICED_COMPILE"
COMPILE_KEY = "torch.compile"            # the host helper's wrapper key (shared with its TorchCompileModel node)
MARK = "flux_juiced_compiled_blocks"     # model_options entry: the keys this pack compiled
_HELPER = "ComfyUI's torch.compile wrapper (comfy_api.torch_helpers.set_torch_compile_wrapper)"


def requested_compile() -> str | None:
    """The compile request from FLUX_JUICED_COMPILE, or None to follow the speed mode."""
    return env_request(ENV)


def _host_device():
    import comfy.model_management

    return comfy.model_management.get_torch_device()


def compute_dtype(model):
    """The dtype the host's blocks compute in: the cast dtype for weights stored in another type (fp8
    storage), else the diffusion model's dtype."""
    import torch

    cast = getattr(getattr(model, "model", None), "manual_cast_dtype", None)
    if cast is not None:
        return cast
    dtype = model.model_dtype() if hasattr(model, "model_dtype") else None
    return dtype if isinstance(dtype, torch.dtype) else torch.bfloat16


def _helper():
    """(set_torch_compile_wrapper, None), or (None, why this host cannot take it)."""
    try:
        from comfy_api.torch_helpers import set_torch_compile_wrapper
        from comfy.patcher_extension import WrappersMP
    except ImportError as error:
        return None, f"this ComfyUI has no comfy_api.torch_helpers.set_torch_compile_wrapper ({error})"
    if not callable(set_torch_compile_wrapper) or not hasattr(WrappersMP, "APPLY_MODEL"):
        return None, "this ComfyUI's torch.compile helper is not the expected one"
    return set_torch_compile_wrapper, None


def _has_compile_wrapper(model) -> bool:
    from comfy.patcher_extension import WrappersMP

    kind = getattr(WrappersMP, "APPLY_MODEL", None)
    return bool(kind and hasattr(model, "get_wrappers") and model.get_wrappers(kind, COMPILE_KEY))


def _remove_ours(model) -> None:
    from comfy.patcher_extension import WrappersMP

    model.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, COMPILE_KEY)
    model.model_options.pop(MARK, None)
    model.model_options.pop("torch_compile_kwargs", None)


def module_keys(blocks) -> list[str]:
    """Model-object keys of the blocks (block_keys order), e.g. "diffusion_model.double_blocks.0"."""
    names = {"double_block": "double_blocks", "single_block": "single_blocks"}
    return [f"diffusion_model.{names[kind]}.{index}" for kind, index in blocks]


def _compile(model, choice: comp.CompileChoice, blocks) -> tuple[comp.CompileChoice, int]:
    """Apply `choice` to `model` (a clone this pack owns); returns the choice as applied and how many blocks."""
    ours = model.model_options.get(MARK) is not None
    if not ours and _has_compile_wrapper(model):
        return comp.CompileChoice(False, "not compiled by this node: the MODEL already carries a torch.compile "
                                         "wrapper from another node (e.g. TorchCompileModel), kept as it is"), 0
    if not choice.enabled:
        if ours:  # an earlier speed node compiled this MODEL; this one says eager
            _remove_ours(model)
        return choice, 0
    set_wrapper, why_not = _helper()
    if set_wrapper is None:
        return comp.CompileChoice(False, f"eager: {why_not}"), 0
    keys = module_keys(blocks)
    try:
        set_wrapper(model, backend=choice.backend, dynamic=choice.dynamic, keys=keys)
    except Exception as error:  # torch.compile is lazy; a failure here means the helper refused
        if ours:
            _remove_ours(model)
        return comp.CompileChoice(False, f"eager: {_HELPER} failed: {type(error).__name__}: {error}"), 0
    model.model_options[MARK] = list(keys)
    return dataclasses.replace(choice, reason=f"{choice.reason}; through {_HELPER}, swapped in during each "
                                              f"model call"), len(keys)


def _host_attention() -> str:
    try:
        from comfy.ldm.flux import math as flux_math
    except ImportError:
        return "its own"
    return getattr(getattr(flux_math, "optimized_attention", None), "__name__", "its own")


def accelerate(model, mode, blocks) -> dict:
    """Plan `mode`'s runtime choices (presets.SpeedMode) for the host's device and `model`'s dtype, apply
    the compile and fp8-matmul choices to `model` (a clone this pack owns) and return the JSON-able summary."""
    from . import host_precision

    requested = requested_compile()
    options = mode.runtime if requested is None else dataclasses.replace(mode.runtime, compile=requested)
    device, dtype = _host_device(), compute_dtype(model)
    report = runtime.plan(options, device, dtype)
    compiled, count = _compile(model, report.compile, blocks)
    if "compile='on' forces it" in compiled.reason:  # the engine's wording; in ComfyUI the switch is ENV
        compiled = dataclasses.replace(compiled, reason=compiled.reason.replace("compile='on'", f"{ENV}=on"))
    summary = report.summary()
    summary.pop("fused_qkv", None)  # an engine layout detail; the host's model has its own
    host_attention = _host_attention()
    summary.update(
        compile=compiled.enabled, compile_reason=compiled.reason, compiled_blocks=count,
        compile_backend=compiled.backend if compiled.enabled else None,
        compile_request_from=ENV if requested is not None else "speed mode",
        attention=f"comfyui:{host_attention}",
        attention_reason=(f"ComfyUI's own attention ({host_attention}, picked by its launch options) in its FLUX "
                          f"model, left as it is: the speed node does not replace host attention. The engine "
                          f"would use {report.attention.name}: {report.attention.reason}"),
        engine_attention=report.attention.name)
    summary.update(host_precision.apply(model, mode, report.precision, device, dtype))
    return summary


def describe(summary: dict) -> str:
    """One log line."""
    compiled = (f"compile on, {summary['compiled_blocks']} blocks" if summary["compile"] else "compile off")
    precision = (f"fp8 matmuls in {summary['fp8_layers']} packed fp8 block linears" if summary["precision"] == "fp8"
                 else f"ComfyUI's ops, no fp8 matmuls from this node: {summary['fp8_reason']}")
    return (f"{compiled} ({summary['compile_reason']}); attention: {summary['attention']} (engine: "
            f"{summary['engine_attention']}); precision: {precision} (engine: {summary['engine_precision']}); "
            f"{summary['device']}, {summary['dtype']}")
