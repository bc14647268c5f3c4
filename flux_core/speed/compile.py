"""torch.compile of the transformer's repeated blocks, or a stated reason not to.

Only the blocks are compiled (each DoubleStreamBlock and SingleStreamBlock, in place with Module.compile, so
names, the state dict and the block loop stay as they are): all blocks of a kind share one compiled graph,
so compiling takes one block's time, not 57 blocks' time. The embedders, the final layer and the Python
loop stay eager.

Shapes: `dynamic=None` is PyTorch's automatic dynamic: the first image size compiles specialised code, and
the first *different* size compiles once more with the token counts symbolic, which then serves every
further aspect ratio and batch size without recompiling (tests/test_speed_runtime.py counts the graphs).

Where it cannot work it is not tried: no torch.compile, Windows without Triton, CUDA without Triton, a CPU
without a C++ compiler, Apple MPS (its inductor backend is experimental). On a CPU it is measured, not
assumed (see CPU_DEFAULT).
"""
from __future__ import annotations

import importlib.util
import platform
import shutil
from dataclasses import dataclass

import torch

# On a CPU "auto" stays eager. Measured (bench/results/transformer_eval-amd-epyc-2cores-24gib.md, hidden 1536,
# 4 + 8 blocks, 1536 tokens): compiled blocks took 15.2 s of CPU per evaluation against 14.9 s eager in fp32
# (17.4 s against 16.5 s in bf16), i.e. no gain, because matmuls and SDPA are ~80% of the time and inductor
# calls the same kernels for them; the compilation itself cost 30-45 s with a cold inductor cache.
# compile="on" compiles anyway.
CPU_DEFAULT = False


@dataclass(frozen=True)
class CompileChoice:
    enabled: bool
    reason: str
    backend: str | None = None
    dynamic: bool | None = None  # None: automatic dynamic shapes (see the module docstring)


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _has_cxx() -> bool:
    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++", "cl"))


def compile_unavailable(device) -> str | None:
    """Why torch.compile (inductor) cannot work on this device here, or None."""
    device = torch.device(device)
    if not hasattr(torch, "compile"):
        return "this PyTorch has no torch.compile"
    if device.type == "cuda":
        if not _has_triton():
            if platform.system() == "Windows":
                return "torch.compile on a CUDA GPU needs Triton, which Windows lacks (pip install triton-windows)"
            return "torch.compile on a CUDA GPU needs Triton, which is not installed"
        return None
    if device.type == "cpu":
        return None if _has_cxx() else "torch.compile on a CPU needs a C++ compiler (none found on PATH)"
    return f"torch.compile is not used on {device.type} (its inductor backend there is experimental)"


def choose_compile(device, requested: str = "auto") -> CompileChoice:
    """Whether to compile the blocks: requested "auto", "on" or "off"."""
    if requested not in ("auto", "on", "off"):
        raise ValueError(f"compile must be 'auto', 'on' or 'off'; got {requested!r}")
    if requested == "off":
        return CompileChoice(False, "compilation off, as requested")
    device = torch.device(device)
    why_not = compile_unavailable(device)
    if why_not is not None:
        return CompileChoice(False, f"eager: {why_not}")
    if device.type == "cpu" and requested == "auto" and not CPU_DEFAULT:
        return CompileChoice(False, "eager: on a CPU compiled blocks measured no faster per evaluation and the "
                                    "compilation takes ~30-45 s (bench/README.md); compile='on' forces it")
    where = "C++/OpenMP kernels" if device.type == "cpu" else "Triton kernels"
    return CompileChoice(True, f"torch.compile (inductor, {where}) of each double and single block, automatic "
                               f"dynamic shapes (one recompile at the second image size, none after)",
                         backend="inductor", dynamic=None)


def compile_blocks(model, choice: CompileChoice) -> int:
    """Compile every block of a flux_core Flux in place per `choice`; returns how many blocks."""
    if not choice.enabled:
        return 0
    blocks = list(model.double_blocks) + list(model.single_blocks)
    for block in blocks:
        block.compile(backend=choice.backend, dynamic=choice.dynamic)
    return len(blocks)


def is_compiled(block) -> bool:
    return getattr(block, "_compiled_call_impl", None) is not None
