"""Step caching (flux_core.speed): budgets, exactness when off, closeness, determinism, forecasting.

All model runs use the tiny demo transformer (random weights, float32, 64x64 images). Random weights say
nothing about visual quality, so closeness is judged against yardsticks that do mean something on any
model: the exact reference (off must be bit-identical), and the cheapest honest alternative with the
same number of full evaluations, i.e. simply sampling with fewer steps.
"""
import copy
import math
import random

import pytest
import torch

import flux_core
from flux_core import sampling
from flux_core.demo import demo_model_files
from flux_core.pipeline import load_models
from flux_core.speed import StepCache, StepCacheConfig, StepPlan, forecast, plan_pattern, presets
from flux_core.speed.caching import min_computes

BUDGET_AT_28 = {presets.LIGHTLY_JUICED: 15, presets.JUICED: 12, presets.EXTRA_JUICED: 9, presets.BLINK: 6}
SIZE, PROMPT, SEED = 64, "a red cube on a table", 3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    paths = demo_model_files(tmp_path_factory.mktemp("demo"))
    return load_models(paths["transformer"], paths["autoencoder"], paths["t5"], paths["clip"], dtype=torch.float32)


def _generate(models, steps, speed_mode=None, **kw):
    return flux_core.generate(PROMPT, models, image_size=SIZE, num_inference_steps=steps, seed=SEED, decode=False,
                              speed_mode=speed_mode, **kw)


@pytest.fixture(scope="module")
def reference(models):
    return {steps: _generate(models, steps) for steps in (15, 28)}


@pytest.fixture(scope="module")
def cached_runs(models):
    """Every preset at 28 and 15 steps, with the number of times the last single block actually ran."""
    runs = {}
    last_block = models.transformer.single_blocks[-1]
    for mode in presets.SPEED_MODES:
        for steps in (28, 15):
            calls = []
            handle = last_block.register_forward_hook(lambda *_: calls.append(1))
            try:
                result = _generate(models, steps, mode)
            finally:
                handle.remove()
            runs[mode, steps] = (result, len(calls))
    return runs


def _inputs(models, steps, size=SIZE, seed=SEED):
    txt, vec = models.text_encoders.encode([PROMPT])
    noise = sampling.get_noise(1, size, size, "cpu", torch.float32, seed)
    inputs = sampling.prepare(noise, txt.float(), vec.float())
    return inputs, sampling.get_schedule(steps, inputs["img"].shape[1])


def _rel_l2(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _max_run(pattern: str) -> int:
    return max((len(r) for r in pattern.split("F")), default=0)


# --------------------------------------------------------------------------------------------------
# Names and presets


def test_speed_mode_names_are_the_design_tables():
    # Saved workflows store these strings: they must never change (the nodes import this list).
    assert presets.SPEED_MODES == ["Lightly Juiced 🍊 (more consistent)", "Juiced 🔥 (default)",
                                   "Extra Juiced 🔥 (more speed)", "Blink of an eye 👁️"]
    assert presets.DEFAULT_SPEED_MODE == "Extra Juiced 🔥 (more speed)"
    assert presets.resolve("JUICED").name == presets.JUICED and presets.resolve("blink").name == presets.BLINK
    assert presets.resolve(None) is None and presets.resolve("off") is None
    for mode in presets.SPEED_MODES:
        assert presets.MODES[mode].budget_at_28 == BUDGET_AT_28[mode]
        assert presets.MODES[mode].runtime.compile == "auto"  # the runtime part: tests/test_speed_runtime.py
    with pytest.raises(ValueError, match="speed_mode"):
        presets.resolve("Ludicrous")


def test_bad_speed_mode_and_config_are_refused(models):
    with pytest.raises(ValueError, match="speed_mode"):
        _generate(models, 2, "Ludicrous")
    with pytest.raises(ValueError, match="threshold"):
        StepCacheConfig(threshold=-0.1)
    with pytest.raises(ValueError, match="warmup"):
        StepCacheConfig(threshold=0.1, warmup_steps=0)
    with pytest.raises(ValueError, match="num_steps"):
        inputs, ts = _inputs(models, 2)
        sampling.denoise(StepCache(models.transformer, StepCacheConfig(threshold=0.1)), **inputs, timesteps=ts)


# --------------------------------------------------------------------------------------------------
# The plan alone: every step count, every preset, every kind of criterion


def _change_patterns(steps):
    rng = random.Random(steps)
    yield "always", [math.inf] * steps
    yield "never", [0.0] * steps
    yield "random", [rng.random() * 0.4 for _ in range(steps)]
    yield "bursts", [0.5 if (i // 4) % 2 else 0.0 for i in range(steps)]


@pytest.mark.parametrize("mode", presets.SPEED_MODES)
def test_plan_keeps_budget_warmup_final_and_cap_for_every_step_count(mode):
    config = presets.MODES[mode].cache
    for steps in range(1, 51):
        plan = StepPlan.build(config, steps)
        scaled = math.ceil(BUDGET_AT_28[mode] * steps / 28)
        assert plan.budget == min(steps, max(plan.warmup + plan.final, scaled)), steps
        cap = config.max_consecutive_skips
        if steps >= 19:  # the preset caps fit the budget at every usual step count ...
            assert plan.max_skips == cap, steps
        if plan.max_skips > cap:  # ... and below that the cap is loosened only as far as the budget needs
            assert plan.warmup + plan.final + min_computes(plan.middle, 0, plan.max_skips - 1) > plan.budget
        for name, changes in _change_patterns(steps):
            pattern = plan_pattern(config, steps, changes)
            assert pattern.count("F") <= plan.budget, (steps, name, pattern)
            assert pattern[:plan.warmup] == "F" * plan.warmup and pattern.endswith("F" * plan.final), pattern
            assert _max_run(pattern) <= plan.max_skips, (steps, name, pattern)
            if steps in (15, 28):
                assert pattern.count("F") > plan.warmup + plan.final, (steps, name, pattern)


def test_min_computes_matches_brute_force():
    def brute(steps, run, cap):  # fewest computes over all patterns of `steps` steps
        best = math.inf
        for mask in range(2 ** steps):
            r, ok = run, True
            for i in range(steps):
                r = 0 if mask >> i & 1 else r + 1
                ok &= r <= cap
            if ok:
                best = min(best, bin(mask).count("1"))
        return best

    for cap in range(0, 4):
        for run in range(0, cap + 1):
            for steps in range(0, 9):
                assert min_computes(steps, run, cap) == brute(steps, run, cap), (steps, run, cap)


def test_adaptive_decisions_follow_the_criterion_within_the_budget():
    config = presets.MODES[presets.JUICED].cache
    quiet = plan_pattern(config, 28, [0.0] * 28)
    busy = plan_pattern(config, 28, [1.0] * 28)
    assert quiet.count("F") < busy.count("F") <= 12
    assert quiet == "FFF...F...F...F...F...F...FF"  # only warm-up, the cap and the final step
    # A quiet first half banks allowance that a busy second half may spend.
    half = plan_pattern(config, 28, [0.0] * 14 + [1.0] * 14)
    assert half[14:].count("F") > busy[14:].count("F")


# --------------------------------------------------------------------------------------------------
# On the tiny model


@pytest.mark.parametrize("steps", [28, 15])
@pytest.mark.parametrize("mode", presets.SPEED_MODES)
def test_each_mode_stays_within_its_budget_and_reports_full_evaluations(cached_runs, mode, steps):
    result, stack_runs = cached_runs[mode, steps]
    config = presets.MODES[mode].cache
    budget = math.ceil(BUDGET_AT_28[mode] * steps / 28)  # 28: 15/12/9/6; 15: 9/7/5/4
    info = result.settings["step_cache"]
    pattern = info["pattern"]
    assert result.settings["speed_mode"] == mode and info["steps"] == steps
    assert config.warmup_steps + config.final_steps < result.evaluations <= budget, pattern
    # The count is true: the end of the stack ran exactly that often (a silent no-op cache would show here).
    assert stack_runs == result.evaluations == info["full_evaluations"] == pattern.count("F")
    assert pattern.startswith("F" * config.warmup_steps) and pattern.endswith("F" * config.final_steps)
    assert _max_run(pattern) <= config.max_consecutive_skips, pattern


def test_off_and_threshold_zero_are_the_exact_reference(models, reference):
    ref = reference[15]
    assert ref.evaluations == 15 and ref.settings["speed_mode"] == "off" and "step_cache" not in ref.settings
    off = _generate(models, 15, "off")
    assert torch.equal(off.latents, ref.latents) and off.evaluations == 15
    inputs, ts = _inputs(models, 15)
    with torch.inference_mode():
        plain = sampling.denoise(models.transformer, **inputs, timesteps=ts, guidance=3.5)
        zero = StepCache(models.transformer, presets.MODES[presets.BLINK].cache.with_(threshold=0.0), num_steps=15)
        assert torch.equal(sampling.denoise(zero, **inputs, timesteps=ts, guidance=3.5), plain)
        assert zero.full_evaluations == 15
        # A cache that computes every step (cap 0) goes through its own split of the forward pass: bit-identical.
        every = StepCache(models.transformer, StepCacheConfig(threshold=0.1, max_consecutive_skips=0), num_steps=15)
        assert torch.equal(sampling.denoise(every, **inputs, timesteps=ts, guidance=3.5), plain)
        assert every.pattern() == "F" * 15


@pytest.mark.parametrize("mode", presets.SPEED_MODES)
def test_cached_output_is_close_to_the_uncached_one(models, reference, cached_runs, mode):
    """Relative L2 of the final latent against the uncached 28-step run.

    Yardsticks: (1) it is at most 2% of the latent (measured 0.2-0.5% on this model), and (2) it is at
    most half the error of the cheap alternative that spends the same number of full evaluations on a
    shorter schedule (measured 3-4x smaller). (2) is the one that means something on random weights.
    """
    ref = reference[28].latents
    result, _ = cached_runs[mode, 28]
    err = _rel_l2(result.latents, ref)
    fewer = _rel_l2(_generate(models, result.evaluations).latents, ref)
    print(f"\n{mode}: {result.evaluations} full evaluations, rel L2 {err:.5f} (fewer steps: {fewer:.5f})")
    assert err <= 0.02, err
    assert err <= 0.5 * fewer, (err, fewer)


def test_same_inputs_same_outputs_and_same_decisions(models):
    inputs, ts = _inputs(models, 28)
    runs = []
    for _ in range(2):
        cache = StepCache(models.transformer, presets.MODES[presets.JUICED].cache, num_steps=28)
        with torch.inference_mode():
            out = sampling.denoise(cache, **inputs, timesteps=ts, guidance=3.5)
        runs.append((out, cache.decisions))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]  # steps, reasons, change values and forecast orders


def test_state_resets_for_a_new_run_shape_or_interrupted_run(models):
    config = presets.MODES[presets.EXTRA_JUICED].cache
    inputs, ts = _inputs(models, 15)
    other, ts_other = _inputs(models, 15, size=48, seed=8)
    with torch.inference_mode():
        fresh = sampling.denoise(StepCache(models.transformer, config, num_steps=15), **inputs, timesteps=ts)
        cache = StepCache(models.transformer, config, num_steps=15)

        class Stop(Exception):
            pass

        def stop_at_seven(info):
            if info.step == 7:
                raise Stop

        with pytest.raises(Stop):  # an interrupted run leaves state behind ...
            sampling.denoise(cache, **inputs, timesteps=ts, callback=stop_at_seven)
        again = sampling.denoise(cache, **inputs, timesteps=ts)  # ... that t going back up clears
        assert torch.equal(again, fresh) and len(cache.decisions) == 15
        sampling.denoise(cache, **other, timesteps=ts_other)  # a new shape
        assert len(cache.decisions) == 15
        assert torch.equal(sampling.denoise(cache, **inputs, timesteps=ts), fresh)  # a completed run, then a new one


def _time_smoothed(model):
    """The tiny model with the fast timestep-embedding channels cut from time_in.

    Random weights mix all 128 sinusoid frequencies of t*1000, the fastest of which turn ~36 rad between
    two of 28 steps, so the random model's features jump erratically from step to step (the first-block
    change is ~0.4 every step). A trained FLUX varies smoothly with t (that is what every step cache relies
    on). Keeping only the channels slower than ~5 rad per unit t gives a random model that does too.
    """
    smooth = copy.deepcopy(model)
    weight = smooth.time_in.in_layer.weight.data
    weight[:, :80] = 0
    weight[:, 128:208] = 0
    return smooth


def _fixed_pattern_error(model, inputs, ts, ref, **overrides):
    config = StepCacheConfig(threshold=math.inf, budget_at_28=9, warmup_steps=2, max_consecutive_skips=4, **overrides)
    cache = StepCache(model, config, num_steps=len(ts) - 1)
    out = sampling.denoise(cache, **inputs, timesteps=ts, guidance=3.5)
    return _rel_l2(out, ref), cache


def test_forecasting_beats_plain_reuse_at_the_same_skip_pattern(models):
    inputs, ts = _inputs(models, 28)
    with torch.inference_mode():
        smooth = _time_smoothed(models.transformer)
        ref = sampling.denoise(smooth, **inputs, timesteps=ts, guidance=3.5)
        reuse, c0 = _fixed_pattern_error(smooth, inputs, ts, ref, forecast_order=0)
        linear, c1 = _fixed_pattern_error(smooth, inputs, ts, ref, forecast_order=1, probe_order=False)
        quad, c2 = _fixed_pattern_error(smooth, inputs, ts, ref, forecast_order=2, probe_order=False)
        probed, cp = _fixed_pattern_error(smooth, inputs, ts, ref, forecast_order=2)
        assert c0.pattern() == c1.pattern() == c2.pattern() == cp.pattern() == "FF....F....F....F....F....FF"
        print(f"\nsmooth tiny model, fixed pattern: reuse {reuse:.2e}, order 1 {linear:.2e}, order 2 {quad:.2e}, "
              f"probed {probed:.2e}")
        assert quad < 0.5 * linear < 0.5 * reuse  # measured ~0.5x and ~0.15x
        assert probed <= 1.01 * quad

        # On the erratic raw random model extrapolation overshoots; the first-block probe falls back to reuse.
        raw_ref = sampling.denoise(models.transformer, **inputs, timesteps=ts, guidance=3.5)
        raw_reuse, _ = _fixed_pattern_error(models.transformer, inputs, ts, raw_ref, forecast_order=0)
        raw_quad, _ = _fixed_pattern_error(models.transformer, inputs, ts, raw_ref, forecast_order=2,
                                           probe_order=False)
        raw_probed, _ = _fixed_pattern_error(models.transformer, inputs, ts, raw_ref, forecast_order=2)
        print(f"raw tiny model, fixed pattern: reuse {raw_reuse:.2e}, order 2 {raw_quad:.2e}, probed {raw_probed:.2e}")
        assert raw_probed < raw_quad and raw_probed <= 1.2 * raw_reuse


def test_forecast_on_a_synthetic_smooth_trajectory():
    """Newton extrapolation in t with uneven spacing: exact for polynomials up to its order, and on a smooth
    curve each order beats the one below at the gaps the presets use."""
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(4, 8, generator=gen) for _ in range(3))
    ts = sampling.get_schedule(28, 256)  # the real shifted, uneven spacing
    quad = lambda t: a + b * t + c * t * t  # noqa: E731
    history = [(ts[i], quad(ts[i])) for i in (2, 6, 10)]
    torch.testing.assert_close(forecast(history, ts[13], 2), quad(ts[13]), rtol=1e-4, atol=1e-4)
    smooth = lambda t: a * math.exp(1.5 * t) + b * t  # noqa: E731
    for known, target in (((6, 11, 16), 20), ((2, 6, 10), 13), ((16, 20, 24), 27)):
        history = [(ts[i], smooth(ts[i])) for i in known]
        errors = [(forecast(history, ts[target], order) - smooth(ts[target])).norm().item() for order in (0, 1, 2)]
        assert errors[2] < 0.5 * errors[1] < 0.25 * errors[0], errors  # measured ~0.25x and ~0.2x
    assert torch.equal(forecast(history, ts[20], 0), history[-1][1])


def test_batches_count_full_evaluations_per_image(models):
    result = flux_core.generate(PROMPT, models, image_size=SIZE, num_inference_steps=15, seed=SEED, num_images=2,
                                decode=False, speed_mode=presets.EXTRA_JUICED)
    assert result.evaluations == result.settings["step_cache"]["full_evaluations"] <= 5
