"""Runtime acceleration of a flux_core Flux: attention kernel, compilation, matmul precision, fused QKV.

    from flux_core.speed.runtime import accelerate
    report = accelerate(model, "Juiced 🔥 (default)")      # or a RuntimeOptions, or None for the defaults
    print(report.describe())                                # what was chosen for each part, and why

`plan(...)` makes the same decisions without touching a model (for hosts that apply them their own way,
such as the ComfyUI speed node on the host's FLUX model).

Each part falls back cleanly and says so: no GPU, an older GPU, Windows without Triton, a missing package,
a dtype a kernel does not take. What changes a model cannot always be undone: fp8 weights replace the bf16
ones and compiled blocks stay compiled, so these stick to the model object (the report says when a part was
kept from an earlier call); attention and fp32 compute follow each call's request.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from . import attention as attn
from . import compile as comp
from . import fp8_linear, precision as prec
from .settings import RuntimeOptions

FUSED_QKV = ("one matmul for q, k and v in each double-block stream and one for q, k, v and the MLP input in "
             "each single block: the reference checkpoint layout, used as stored (diffusers runs q, k, v as three)")


@dataclass(frozen=True)
class AccelerationReport:
    device: str
    dtype: str
    options: RuntimeOptions
    attention: attn.AttentionChoice
    compile: comp.CompileChoice
    precision: prec.PrecisionChoice
    fused_qkv: str = FUSED_QKV

    def summary(self) -> dict:
        """JSON-able: for GenerationResult.settings, logs and image metadata."""
        return {"device": self.device, "dtype": self.dtype, "options": asdict(self.options),
                "attention": self.attention.name, "attention_reason": self.attention.reason,
                "compile": self.compile.enabled, "compile_reason": self.compile.reason,
                "precision": self.precision.name, "precision_reason": self.precision.reason,
                "fused_qkv": True}

    def describe(self) -> str:
        return "\n".join([f"attention: {self.attention.name} ({self.attention.reason})",
                          f"compile: {'on' if self.compile.enabled else 'off'} ({self.compile.reason})",
                          f"precision: {self.precision.name} ({self.precision.reason})",
                          f"fused qkv: {self.fused_qkv}"])


def options_for(speed_mode=None) -> RuntimeOptions:
    """RuntimeOptions from a speed mode (name, alias or presets.SpeedMode), RuntimeOptions itself, or None."""
    if isinstance(speed_mode, RuntimeOptions):
        return speed_mode
    if speed_mode is None:
        return RuntimeOptions()
    from . import presets

    mode = presets.resolve(speed_mode) if isinstance(speed_mode, str) else speed_mode
    if mode is None:  # "off": the exact reference, nothing applied
        return RuntimeOptions(attention="sdpa", compile="off", precision="native")
    return mode.runtime


def plan(speed_mode=None, device="cpu", dtype: torch.dtype = torch.bfloat16) -> AccelerationReport:
    """The choices for this device and dtype, without a model."""
    options = options_for(speed_mode)
    device = torch.device(device)
    return AccelerationReport(
        device=str(device), dtype=str(dtype).replace("torch.", ""), options=options,
        attention=attn.choose_attention(device, dtype, options.attention),
        compile=comp.choose_compile(device, options.compile),
        precision=prec.choose_precision(device, dtype, options.precision))


def _without_repacking(report: AccelerationReport) -> AccelerationReport:
    why = "the transformer blocks are streamed (offload)"
    compiled, chosen = report.compile, report.precision
    if compiled.enabled:
        compiled = comp.CompileChoice(False, f"eager: {why}, and the streaming hooks do not compile")
    if chosen.name == "fp8":
        chosen = prec.PrecisionChoice("native", f"model dtype: {why}; fp8 would need the weights repacked")
    return AccelerationReport(report.device, report.dtype, report.options, report.attention, compiled, chosen)


def _held(model) -> dict:
    return model.__dict__.setdefault("_flux_runtime", {})


def accelerate(model, speed_mode=None, device=None, streamed: bool = False) -> AccelerationReport:
    """Apply the choices for `speed_mode` (see options_for) to a flux_core Flux in place; returns the report.

    Idempotent: calling it again with the same request changes nothing. device: where the blocks compute
    (default: where the model is). streamed: the blocks are streamed through the device by offload hooks,
    which neither fp8 weights (they repack the weights) nor compiled blocks (the hooks copy) go with yet."""
    device = torch.device(device) if device is not None else model.device
    dtype = model.dtype
    report = plan(speed_mode, device, dtype)
    if streamed:
        report = _without_repacking(report)
    held = _held(model)
    with torch.inference_mode(False), torch.no_grad():  # new weights must be normal tensors, also in generate()
        report = _apply(model, report, held)
    held["report"] = report
    return report


def _apply(model, report: AccelerationReport, held: dict) -> AccelerationReport:
    attn.set_attention(model, report.attention)

    chosen = report.precision
    if held.get("fp8"):
        if chosen.name != "fp8":
            chosen = prec.PrecisionChoice("fp8", "fp8 weights kept: this model was quantized by an earlier call "
                                                 "(reload it for the model dtype)")
    elif chosen.name == "fp8":
        prec.set_fp32_compute(model, on=False)
        if fp8_linear.has_plain_block_linears(model):
            fp8_linear.quantize_model(model)
            held["fp8"] = True
        else:
            chosen = prec.PrecisionChoice("native", "not fp8: the block weights are stored quantized by the loader "
                                                    "(flux_core.quant); fp8 matmuls need plain linears")
    else:
        prec.set_fp32_compute(model, on=chosen.name == "fp32-compute")

    compiled = report.compile
    if held.get("compiled"):
        if not compiled.enabled:
            compiled = comp.CompileChoice(True, "blocks kept compiled from an earlier call on this model",
                                          backend="inductor")
    elif compiled.enabled:
        comp.compile_blocks(model, compiled)
        held["compiled"] = True

    return AccelerationReport(report.device, report.dtype, report.options, report.attention, compiled, chosen)


def current(model) -> AccelerationReport | None:
    """The report of the last accelerate() on this model, or None if it never ran."""
    return model.__dict__.get("_flux_runtime", {}).get("report")
