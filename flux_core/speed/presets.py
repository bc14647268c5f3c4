"""The four speed modes: mode name -> step-caching strength plus compilation, precision and attention.

Caching is `cache` (caching.StepCache); `compile`, `precision` and `attention` are the requests that
runtime.accelerate turns into choices for the device at hand, each with a stated fallback:

* every mode compiles the blocks where that pays ("auto": on CUDA with Triton; eager on a CPU, where one
  image does not earn back the compilation, see compile.py);
* Lightly Juiced keeps the model's precision up to rounding (the most consistent; on a CPU without bf16
  instructions its bf16 matmuls run in float32, precision.py); Juiced, Extra Juiced and Blink use fp8
  matmuls with per-row scales on GPUs with fp8 tensor cores (compute capability 8.9+), the recipe of the
  fastest published single-GPU FLUX pipelines (speed.md 0 and 3: fp8 dynamic row-wise + compile);
* Blink of an eye also asks for SageAttention (8-bit attention) where it is installed; the others use
  PyTorch SDPA (flash / cuDNN on CUDA), which is exact up to kernel rounding.

Where the caching numbers come from (shared/reference/speed.md, all FLUX.1 [dev], 28 steps unless noted):

* **Budgets** (full transformer evaluations per image at 28 steps) follow Pruna's own predictor, whose
  modes differ only in the speed_factor of its TaylorSeer-style auto cacher: 0.5 / 0.4 / 0.3 at 28 steps
  (speed.md 1.1), read as the fraction of full evaluations: 14 / 11.2 / 8.4. We round up and keep one
  step of margin for the lightest mode: 15 (= FORA interval 2, "15 of 28 computed", speed.md 1.2) /
  12 / 9. "Blink of an eye" has no public definition (speed.md 1.1 calls a lower factor an assumption);
  6 of 28 is about the "22% steps" row of the FoCa table and TaylorSeer N=7 (one full step in seven,
  5.5x, ImageReward 0.91 vs 0.99; speed.md 2.3).
* **Thresholds** are First Block Cache thresholds on the relative L1 change of the first block's
  residual (the criterion this engine uses): 0.08 is the FLUX default (ParaAttention, 1.55x, speed.md
  2.2); 0.12 is the fp8 value of ParaAttention / Comfy-WaveSpeed and the DBCache F1B0 R0.12 row (2.14x,
  LPIPS 0.15 at 50 steps), also flux-fast's cache-dit config with TaylorSeer order 2 (speed.md 2.3);
  0.20 is DBCache F1B0 W4 MC4 R0.2 (2.41x); 0.24 is DBCache F1B0 W4 MC6 R0.24 (2.75x) and the default
  of MagCache (on a different statistic, speed.md 2.5).
* **Consecutive-skip caps**: 2 (FORA interval 2), 3 (ComfyUI-TeaCache's recommended max_skip_steps 3,
  speed.md 2.1), 4 (DBCache MC4 and Pruna's adaptive cacher's default max_skip_steps 4, speed.md 1.1),
  6 (DBCache MC6; TaylorSeer N=7 forecasts six steps in a row).
* **Warm-up**: 3 steps for the two lighter modes (MagCache's retention ratio 0.1 -> the first 10% of 28
  steps), 2 for the faster ones: with 3, Blink's 6 could not hold its cap (3 + 1 final + 3 forced > 6)
  and Extra would keep a single adaptive compute; flux-fast's cache-dit config runs with no warm-up at
  all (W0, speed.md 2.3), so 2 is still on the careful side, and two full steps are what a first-order
  forecast needs. The last step is always computed (TeaCache computes the first and last steps).
* **Forecast**: up to second order in t (TaylorSeer O=2 is the best setting at 3.6x and 5.5x in the
  FoCa table; flux-fast pairs DBCache with TaylorSeer order 2; order 1 alone already lifts DBCache F8B0
  from 35.2 to 36.7 dB PSNR, speed.md 2.3), with the order picked per step by the first-block probe
  (caching.StepCache), so an erratic trajectory falls back to plain reuse instead of overshooting.
"""
from __future__ import annotations

from dataclasses import dataclass

from .settings import REFERENCE_STEPS, RuntimeOptions, StepCacheConfig

OFF = "off"

LIGHTLY_JUICED = "Lightly Juiced 🍊 (more consistent)"
JUICED = "Juiced 🔥 (default)"
EXTRA_JUICED = "Extra Juiced 🔥 (more speed)"
BLINK = "Blink of an eye 👁️"
# Same strings, same order as the pack's widget (nodes/inputs.py SPEED_MODES).
SPEED_MODES = [LIGHTLY_JUICED, JUICED, EXTRA_JUICED, BLINK]
DEFAULT_SPEED_MODE = EXTRA_JUICED  # the design table's default

# Short names for scripts and the CLI.
ALIASES = {"lightly": LIGHTLY_JUICED, "lightly-juiced": LIGHTLY_JUICED, "juiced": JUICED,
           "extra": EXTRA_JUICED, "extra-juiced": EXTRA_JUICED, "blink": BLINK, "blink-of-an-eye": BLINK}


@dataclass(frozen=True)
class SpeedMode:
    name: str
    cache: StepCacheConfig
    compile: str = "auto"     # auto | on | off (compile.choose_compile)
    precision: str = "auto"   # native | auto | fp8 (precision.choose_precision)
    attention: str = "sdpa"   # auto | sdpa | sage | math (attention.choose_attention)

    @property
    def budget_at_28(self) -> int:
        return self.cache.budget_at_28 if self.cache.budget_at_28 is not None else REFERENCE_STEPS

    @property
    def runtime(self) -> RuntimeOptions:
        return RuntimeOptions(attention=self.attention, compile=self.compile, precision=self.precision)


MODES = {
    LIGHTLY_JUICED: SpeedMode(
        LIGHTLY_JUICED,
        StepCacheConfig(threshold=0.08, budget_at_28=15, warmup_steps=3, final_steps=1, max_consecutive_skips=2,
                        forecast_order=2),
        precision="auto"),
    JUICED: SpeedMode(
        JUICED,
        StepCacheConfig(threshold=0.12, budget_at_28=12, warmup_steps=3, final_steps=1, max_consecutive_skips=3,
                        forecast_order=2),
        precision="fp8"),
    EXTRA_JUICED: SpeedMode(
        EXTRA_JUICED,
        StepCacheConfig(threshold=0.20, budget_at_28=9, warmup_steps=2, final_steps=1, max_consecutive_skips=4,
                        forecast_order=2),
        precision="fp8"),
    BLINK: SpeedMode(
        BLINK,
        StepCacheConfig(threshold=0.24, budget_at_28=6, warmup_steps=2, final_steps=1, max_consecutive_skips=6,
                        forecast_order=2),
        precision="fp8", attention="sage"),
}


def resolve(speed_mode: str | None) -> SpeedMode | None:
    """The mode for a name (full widget name or a short alias); None for None or "off" (exact reference)."""
    if speed_mode is None:
        return None
    if not isinstance(speed_mode, str):
        raise ValueError(f"speed_mode must be a string; got {speed_mode!r}")
    key = speed_mode.strip()
    if key.lower() == OFF:
        return None
    if key in MODES:
        return MODES[key]
    if key.lower() in ALIASES:
        return MODES[ALIASES[key.lower()]]
    raise ValueError(f"speed_mode must be one of {', '.join(SPEED_MODES)} or {OFF!r}; got {speed_mode!r}")


def step_cache_config(speed_mode: str | None) -> StepCacheConfig | None:
    """The caching config of a mode, or None when caching is off."""
    mode = resolve(speed_mode)
    return mode.cache if mode is not None and mode.cache.enabled else None


def budget(speed_mode: str, num_steps: int) -> int:
    """Full evaluations per image a mode may use at num_steps steps."""
    from .caching import StepPlan

    mode = resolve(speed_mode)
    if mode is None:
        return num_steps
    return StepPlan.build(mode.cache, num_steps).budget
