"""Speed modes of the engine. Implemented so far: step caching (caching.py) and the mode presets
(presets.py). Compilation, fp8/int8 linears and attention backends are described in presets.py and
not applied yet.

    from flux_core.speed import StepCache, presets
    cache = StepCache(model, presets.step_cache_config("Juiced 🔥 (default)"), num_steps=28)
    sampling.denoise(cache, ...)   # in place of the model; cache.decisions says what ran
"""
from __future__ import annotations

from . import presets
from .caching import StepCache, StepCacheConfig, StepDecision, StepPlan, StepPlanner, forecast, plan_pattern
from .presets import DEFAULT_SPEED_MODE, SPEED_MODES, SpeedMode

__all__ = ["StepCache", "StepCacheConfig", "StepDecision", "StepPlan", "StepPlanner", "forecast", "plan_pattern",
           "presets", "SPEED_MODES", "DEFAULT_SPEED_MODE", "SpeedMode"]
