"""The speed node: a FLUX.1 MODEL in, the same MODEL with a speed mode's step caching out (host_step_cache)."""
from __future__ import annotations

import logging

from ..flux_core.speed import presets
from . import inputs

OFF = "Off"
CHOICES = presets.SPEED_MODES + [OFF]  # the all-in-one node's labels, plus the exact reference
LOG = logging.getLogger("flux_juiced.speed")


def _short_name(mode_name: str) -> str:
    """The longest CLI alias of a mode (ASCII, for log lines on consoles without emoji)."""
    return max((alias for alias, name in presets.ALIASES.items() if name == mode_name), key=len, default=mode_name)


def apply_speed_mode(model, speed_mode: str):
    """(MODEL, cache): a clone of `model` with the mode's step caching attached (and, where the engine's
    runtime plan says so, its blocks compiled and its packed fp8 block linears run as fp8 matmuls:
    host_compile, host_precision), and the HostStepCache whose last_run reports each sampling run and whose
    `acceleration` holds the runtime choices. "Off" (or a host without the extension points, with a warning)
    gives the MODEL itself, untouched, and None. ValueError for an unknown mode or a MODEL that is not
    ComfyUI's own FLUX transformer."""
    from . import host_compile, host_step_cache

    mode = presets.resolve(speed_mode)
    if mode is None or not mode.cache.enabled:
        return model, None
    reason = host_step_cache.unsupported(model)
    if reason:
        LOG.warning("%s: %s; the MODEL is returned unchanged (no speed-up)", host_step_cache.TITLE, reason)
        return model, None
    blocks = host_step_cache.block_keys(model)  # refuse a non-FLUX MODEL before cloning anything
    patched = model.clone()
    cache = host_step_cache.HostStepCache(mode.name, mode.cache, _short_name(mode.name))
    cache.attach(patched)
    cache.acceleration = host_compile.accelerate(patched, mode, blocks)
    LOG.info("%s [%s]: %s", host_step_cache.TITLE, cache.short_name, host_compile.describe(cache.acceleration))
    return patched, cache


class FluxJuicedSpeed:
    DESCRIPTION = ("Applies a speed mode to a FLUX.1 MODEL (this pack's loader or the native UNETLoader) for any "
                   "sampler: KSampler, SamplerCustomAdvanced or the pack's sampler. Step caching: the first "
                   "transformer block runs every step and measures how much the model's features moved; on "
                   "steps the mode may skip, the rest of the transformer is forecast from the last full steps "
                   "instead of computed. At 28 steps at most 15 / 12 / 9 / 6 full evaluations (Lightly / Juiced "
                   "/ Extra / Blink), scaled for other step counts; the first and last steps always run. The "
                   "count is logged after each run and saved by Save Image (Juiced). Works through ComfyUI's "
                   "block patches and wrappers, so it chains with LoRA and other patches; put it last in the "
                   "MODEL chain. Best with deterministic samplers (euler); ancestral/SDE samplers blur more. "
                   "The blocks are also torch.compiled (ComfyUI's compile wrapper) where the engine finds it pays: "
                   "on CUDA with Triton, not on a CPU; the environment variable FLUX_JUICED_COMPILE=on|off|auto "
                   "overrides that. On a MODEL loaded with weight_dtype fp8 (FLUX.1 Transformer Loader (Juiced)), "
                   "the modes that ask for fp8 (not Lightly) run its block linears as fp8 matmuls from the stored "
                   "fp8 weights on GPUs that have them (compute capability 8.9+, bf16); FLUX_JUICED_FP8_MATMUL="
                   "on|off|auto overrides that. Attention stays ComfyUI's own. The choices are logged and saved.")
    CATEGORY = inputs.CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same model with the speed mode attached (the input MODEL itself for Off).",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A FLUX.1 model on ComfyUI's own FLUX transformer."}),
            "speed_mode": (CHOICES, {"default": presets.DEFAULT_SPEED_MODE,
                                     "tooltip": "How many steps may be forecast instead of computed: at 28 steps "
                                                "at most 15 / 12 / 9 / 6 full evaluations, fewer steps scale "
                                                "down. Off returns the model untouched (the exact reference)."}),
        }}

    def apply(self, model, speed_mode):
        return (apply_speed_mode(model, speed_mode)[0],)
