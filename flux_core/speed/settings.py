"""The plain settings a speed mode is made of: step-cache strength and runtime requests. No torch here, so
the presets (and whatever only checks a mode's name, such as a batch jobs file) import without it."""
from __future__ import annotations

from dataclasses import dataclass, replace

REFERENCE_STEPS = 28  # budgets are given at the usual FLUX.1 [dev] step count and scaled from there


@dataclass(frozen=True)
class StepCacheConfig:
    """Caching strength. See flux_core.speed.presets for the four modes and where their numbers come from.

    threshold:              relative L1 change of the first block's residual since the last full step
                            above which a step asks to be computed. 0 = caching off; inf = never asks.
    budget_at_28:           at most this many full evaluations per image at 28 steps, scaled to other step
                            counts by ceil(budget * steps / 28) (never below warm-up + final steps);
                            None = no budget beyond the step count.
    warmup_steps:           the first steps, always computed (at least 1: the first step fills the cache).
    final_steps:            the last steps, always computed.
    max_consecutive_skips:  forecasts in a row before a step is computed regardless (loosened only when
                            the budget could not be met otherwise, see StepPlan.build).
    forecast_order:         0 = reuse the cached residual, 1 = linear, 2 = quadratic extrapolation in t.
    probe_order:            pick, per skipped step, the order (0..forecast_order) that best predicts the
                            freshly computed first-block residual from its own history; False = always
                            use forecast_order (as far as the history allows).
    """

    threshold: float = 0.0
    budget_at_28: int | None = None
    warmup_steps: int = 3
    final_steps: int = 1
    max_consecutive_skips: int = 3
    forecast_order: int = 2
    probe_order: bool = True

    def __post_init__(self):
        if not (self.threshold >= 0):  # also rejects NaN
            raise ValueError(f"threshold must be >= 0 (0 = off); got {self.threshold!r}")
        if self.budget_at_28 is not None and self.budget_at_28 < 1:
            raise ValueError(f"budget_at_28 must be a positive integer or None; got {self.budget_at_28!r}")
        for name in ("warmup_steps", "final_steps", "max_consecutive_skips"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)!r}")
        if self.warmup_steps < 1:
            raise ValueError("warmup_steps must be at least 1: the first step fills the cache")
        if self.forecast_order not in (0, 1, 2):
            raise ValueError(f"forecast_order must be 0, 1 or 2; got {self.forecast_order!r}")

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    def with_(self, **changes) -> "StepCacheConfig":
        return replace(self, **changes)


@dataclass(frozen=True)
class RuntimeOptions:
    attention: str = "auto"   # auto | sdpa | sage | math
    compile: str = "auto"     # auto | on | off
    precision: str = "auto"   # native | auto | fp8
