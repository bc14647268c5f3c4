"""Speed modes of the engine: step caching (caching.py), the runtime choices of compilation, matmul precision
and attention kernel (runtime.py: compile.py, precision.py, fp8_linear.py, attention.py), and the mode
presets that combine them (presets.py).

    from flux_core.speed import StepCache, presets
    cache = StepCache(model, presets.step_cache_config("Juiced 🔥 (default)"), num_steps=28)
    sampling.denoise(cache, ...)   # in place of the model; cache.decisions says what ran

    from flux_core.speed import accelerate
    report = accelerate(model, "Juiced 🔥 (default)")   # compile / fp8 / attention for this device, with reasons
"""
from __future__ import annotations

from ..lazy import lazy_getattr
from . import presets
from .presets import DEFAULT_SPEED_MODE, SPEED_MODES, SpeedMode
from .settings import RuntimeOptions, StepCacheConfig

# The rest needs torch: imported on first use, so the presets and settings stay importable without it.
_LAZY = {name: "caching" for name in ("StepCache", "StepDecision", "StepPlan", "StepPlanner", "forecast",
                                      "plan_pattern")}
_LAZY.update({name: "runtime" for name in ("AccelerationReport", "accelerate", "plan")})

__all__ = ["presets", "SPEED_MODES", "DEFAULT_SPEED_MODE", "SpeedMode", "RuntimeOptions", "StepCacheConfig",
           *_LAZY]

__getattr__ = lazy_getattr(__name__, _LAZY)
