"""Step caching on the CPU: every speed mode at 28 steps against the uncached run, same seed.

    .venv/bin/python bench/step_cache.py                 # mid-size random model (default), ~9 minutes on 2 cores
    .venv/bin/python bench/step_cache.py --model tiny    # the tiny demo model, ~1.5 minutes

For each mode: full transformer evaluations, denoising time, and the relative L2 of the final latent
against the uncached run. Two yardsticks go with it: the same number of evaluations spent on a plain
shorter schedule ("fewer steps"), and the same run on a time-smoothed copy of the model (random weights
with the fast timestep-embedding channels removed, so its features change smoothly over t as a trained
model's do). Random weights cannot judge visual quality: these numbers check the mechanics (budgets,
speed-up, and that the forecast follows the trajectory), not how the images look.

Prints a table and writes bench/results/step_cache-<cpu>-<cores>cores-<ram>gib.md (no host name).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import flux_core  # noqa: E402
from flux_core.demo import TINY_FLUX, demo_model_files  # noqa: E402
from flux_core.model import Flux, FluxParams  # noqa: E402
from flux_core.pipeline import FluxModels, load_models  # noqa: E402
from flux_core import sampling  # noqa: E402
from flux_core.presets import DEFAULT_GUIDANCE as GUIDANCE  # noqa: E402
from flux_core.speed import StepCache, StepCacheConfig, presets  # noqa: E402
from machine import machine, machine_slug  # noqa: E402 (bench/ is the script's folder)

# A mid-size model: full head width (128, so the rotary axes are the real 16/56/56), the real 1:2 ratio of
# double to single blocks, a sixth of the real width.
MID_FLUX = FluxParams(hidden_size=512, num_heads=4, depth=3, depth_single_blocks=6, context_in_dim=64, vec_in_dim=64,
                      axes_dim=[16, 56, 56])
PROMPT, SEED, STEPS = "a lighthouse on a cliff at dusk, oil painting", 42, 28


def time_smoothed(model: Flux) -> Flux:
    """A copy whose time embedding keeps only the sinusoid channels slower than ~5 rad per unit t."""
    smooth = copy.deepcopy(model)
    weight = smooth.time_in.in_layer.weight.data
    half = weight.shape[1] // 2
    cut = int(half * 0.625)  # channels 0..79 of 128 turn faster than ~5 rad per unit t
    weight[:, :cut] = 0
    weight[:, half:half + cut] = 0
    return smooth


def build(which: str, cache_dir: Path) -> tuple[FluxModels, str]:
    paths = demo_model_files(cache_dir)
    models = load_models(paths["transformer"], paths["autoencoder"], paths["t5"], paths["clip"], dtype=torch.float32)
    if which == "tiny":
        p = TINY_FLUX
        return models, (f"tiny demo model (hidden {p.hidden_size}, {p.num_heads} heads, {p.depth} double + "
                        f"{p.depth_single_blocks} single blocks), float32")
    torch.manual_seed(0)
    p = MID_FLUX
    transformer = Flux(p).float().eval()
    models.transformer = transformer
    return models, (f"mid-size random model (hidden {p.hidden_size}, {p.num_heads} heads of 128, {p.depth} double + "
                    f"{p.depth_single_blocks} single blocks, {sum(x.numel() for x in transformer.parameters()) / 1e6:.0f}"
                    f" M parameters), float32; tiny demo text encoders")


def run(models, transformer, mode, image_size, steps=STEPS):
    m = FluxModels(transformer, None, models.text_encoders)
    result = flux_core.generate(PROMPT, m, image_size=image_size, num_inference_steps=steps, seed=SEED, decode=False,
                                speed_mode=mode)
    return result


def runtime_note(acceleration: dict | None) -> str:
    """What the mode's runtime part chose on this machine (flux_core.speed.runtime), in a few words."""
    if not acceleration:
        return "none (reference)"
    return (f"{acceleration['attention']}, compile {'on' if acceleration['compile'] else 'off'}, "
            f"{acceleration['precision']}")


# Where each mode's numbers come from (flux_core/speed/presets.py has the full account).
SOURCES = [
    "Budgets (full evaluations at 28 steps) 15 / 12 / 9 / 6: Pruna's own predictor sets speed_factor 0.5 / 0.4 / "
    "0.3 at 28 steps (14 / 11.2 / 8.4 evaluations, rounded up, one step of margin for Lightly); Blink has no "
    "public definition, 6 of 28 is the FoCa table's '22% steps' row and TaylorSeer N=7 (speed.md 1.1, 2.3).",
    "Thresholds on the first block's relative L1 change 0.08 / 0.12 / 0.20 / 0.24: 0.08 is First Block Cache's "
    "FLUX default (ParaAttention, 1.55x); 0.12 its fp8 value (ParaAttention, Comfy-WaveSpeed) and DBCache F1B0 "
    "R0.12; 0.20 DBCache R0.2 (2.41x); 0.24 DBCache R0.24 (2.75x) (speed.md 2.2, 2.3).",
    "Consecutive-skip caps 2 / 3 / 4 / 6: FORA interval 2; ComfyUI-TeaCache max_skip_steps 3; DBCache MC4 and "
    "Pruna's adaptive cacher; DBCache MC6 / TaylorSeer N=7 (speed.md 1.1, 2.1, 2.3).",
    "Compile / precision / attention per mode: presets.py; on this CPU they fall back as the runtime column says "
    "(no fp8 tensor cores, no SageAttention, compilation not earned back within one image).",
]


def rel_l2(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mid", "tiny"], default="mid")
    parser.add_argument("--image-size", type=int, default=None, help="default: 256 (mid) or 128 (tiny)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per mode, interleaved (the minimum is reported)")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "demo"))
    parser.add_argument("--out", default=None, help="results file (default bench/results/step_cache-<machine>.md)")
    args = parser.parse_args()
    image_size = args.image_size or (256 if args.model == "mid" else 128)

    models, description = build(args.model, Path(args.cache_dir))
    smooth = time_smoothed(models.transformer)
    run(models, models.transformer, None, image_size, steps=2)  # warm the kernels up

    modes = [None] + presets.SPEED_MODES
    # Timing: rounds over all modes, interleaved, so drifting load on a shared machine hits all alike.
    times = {mode: [] for mode in modes}
    results = {}
    for _ in range(max(1, args.repeat)):
        for mode in modes:
            results[mode] = run(models, models.transformer, mode, image_size)
            times[mode].append(results[mode].timings["denoise_s"])
    base_time = min(times[None])
    refs = {"raw": results[None].latents, "smooth": run(models, smooth, None, image_size).latents}

    rows = []
    for mode in modes:
        result = results[mode]
        smooth_result = run(models, smooth, mode, image_size) if mode else None
        k = result.evaluations
        fewer = rel_l2(run(models, models.transformer, None, image_size, steps=k).latents, refs["raw"]) if mode else 0.0
        fewer_smooth = rel_l2(run(models, smooth, None, image_size, steps=k).latents, refs["smooth"]) if mode else 0.0
        full_pattern = "F" * STEPS
        rows.append({
            "mode": mode or "off (exact reference)",
            "budget": presets.budget(mode, STEPS) if mode else STEPS,
            "full": k,
            "pattern": result.settings.get("step_cache", {"pattern": full_pattern})["pattern"],
            "time": min(times[mode]),
            "speedup": base_time / min(times[mode]),
            "ideal": STEPS / k,
            "rel_l2": rel_l2(result.latents, refs["raw"]),
            "fewer": fewer,
            "smooth_pattern": smooth_result.settings["step_cache"]["pattern"] if mode else full_pattern,
            "smooth_rel_l2": rel_l2(smooth_result.latents, refs["smooth"]) if mode else 0.0,
            "fewer_smooth": fewer_smooth,
            "runtime": runtime_note(result.settings.get("acceleration")),
        })
        r = rows[-1]
        print(f"{r['mode']:40s} full {r['full']:2d}/{STEPS} (budget {r['budget']:2d})  {r['time']:6.2f} s  "
              f"x{r['speedup']:.2f} (ideal x{r['ideal']:.2f})  rel L2 {r['rel_l2']:.5f} (fewer steps "
              f"{r['fewer']:.5f})  smooth {r['smooth_rel_l2']:.6f} (fewer steps {r['fewer_smooth']:.5f})", flush=True)

    # Where the criterion sits on each model, for reading the thresholds.
    changes = {}
    for label, model in (("raw", models.transformer), ("smooth", smooth)):
        cache = StepCache(model, StepCacheConfig(threshold=1.0, max_consecutive_skips=0), num_steps=STEPS)
        with torch.inference_mode():
            txt, vec = models.text_encoders.encode([PROMPT])
            noise = sampling.get_noise(1, image_size, image_size, "cpu", torch.float32, SEED)
            inputs = sampling.prepare(noise, txt.float(), vec.float())
            sampling.denoise(cache, **inputs, timesteps=sampling.get_schedule(STEPS, inputs["img"].shape[1]),
                             guidance=GUIDANCE)
        values = [d.change for d in cache.decisions if d.change is not None]
        changes[label] = (min(values), statistics.median(values), max(values))

    write_results(args, rows, changes, description, image_size)


def write_results(args, rows, changes, description, image_size):
    m = machine()
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"step_cache-{machine_slug(m)}.md"
    lines = [
        "# Step caching: every speed mode at 28 steps vs the uncached run",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']:.1f} GiB RAM, {m['os']}; Python {m['python']}, "
        f"torch {m['torch']} ({m['threads']} threads), CPU only.",
        "",
        f"Model: {description}. Image {image_size}x{image_size}, prompt {PROMPT!r}, seed {SEED}, guidance "
        f"{GUIDANCE}, {STEPS} steps, flow-matching Euler. Time = denoising loop only, "
        f"min of {max(1, args.repeat)} interleaved run(s) per mode; a shared machine, so times are noisy.",
        "",
        "**Random weights cannot judge visual quality.** The relative L2 of the final latent against the "
        "uncached run (same seed) checks the mechanics only. Two yardsticks sit beside it: *fewer steps* is "
        "the same number of full evaluations spent on a plain shorter schedule; *smooth* is the same model "
        "with the fast timestep-embedding channels removed, so that its features change smoothly over t as a "
        "trained model's do (the raw random model's change erratically from step to step, which no step "
        "cache can forecast).",
        "",
        "| mode | full evals (budget) | pattern (F = full, . = forecast) | denoise s | speed-up (28 / full) | rel L2 | fewer steps | smooth: pattern | smooth: rel L2 | smooth: fewer steps | runtime here |",
        "|---|---:|---|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['full']} ({r['budget']}) | `{r['pattern']}` | {r['time']:.2f} | "
                     f"{r['speedup']:.2f}x ({r['ideal']:.2f}x) | {r['rel_l2']:.5f} | {r['fewer']:.5f} | `{r['smooth_pattern']}` | "
                     f"{r['smooth_rel_l2']:.6f} | {r['fewer_smooth']:.5f} | {r['runtime']} |")
    lines += [
        "",
        "First-block change criterion per step (min / median / max), against the mode thresholds "
        "0.08 / 0.12 / 0.20 / 0.24:",
        "",
    ]
    for label, (lo, med, hi) in changes.items():
        lines.append(f"* {label}: {lo:.3f} / {med:.3f} / {hi:.3f} (one step apart)")
    lines += ["", "Where the numbers come from (shared/reference/speed.md):", ""] + [f"* {line}" for line in SOURCES]
    lines += [
        "",
        "Reading it:",
        "* On the raw random model the change is far above every threshold, so each mode spends its whole "
        "budget, paced evenly; on the smooth copy the change stays below, so only warm-up, the "
        "consecutive-skip cap and the final step compute. On a trained FLUX the change sits around the "
        "thresholds (First Block Cache at 0.08 skips about a third of 28 steps, speed.md 2.2), so the "
        "adaptive part decides there; these two models only show the two ends.",
        "* The speed-up stays below 28 / full evaluations because every step still runs the embeddings, the "
        "first double block, the forecast and the final layer: a larger share of this small model than of "
        "FLUX's 19 + 38 blocks, where the first block is about 1/57 of a step.",
        "",
        f"Command: `.venv/bin/python bench/step_cache.py --model {args.model}"
        + (f" --image-size {args.image_size}" if args.image_size else "")
        + (f" --repeat {args.repeat}" if args.repeat != 3 else "") + "`",
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
