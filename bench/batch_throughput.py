"""Batch throughput: images per minute of `python -m flux_core batch` with 1 and 2 workers.

    .venv/bin/python bench/batch_throughput.py                  # tiny demo model on the CPU, ~3 minutes on 2 cores
    .venv/bin/python bench/batch_throughput.py --model full     # full-size random transformer + autoencoder, GPU

Each configuration runs the same jobs file into a fresh folder through the real batch path (jobs file,
driver, manifest, atomic files) and reports two rates:
* steady: images per minute from the end of the first generate() call to the last finished image, i.e.
  with the models loaded (what a long batch runs at);
* end to end: all images over the whole run, start-up (Ray, model loading) included.

Tiny model, CPU: the engine in this process (1 worker with every core as torch threads, then with 1
thread), then Ray in local mode with 1 worker (every core) and 2 workers (half the cores each). The
1-thread row is the fair baseline for N single-thread workers: the tiny model gains little from more
threads, and on a busy machine extra threads can cost more than they bring.

Full model (needs a GPU): the real FLUX.1 [dev] transformer and autoencoder shapes with random bf16
weights, the tiny demo text encoders (the transformer's text projection takes their width), one worker,
generate() batches of 1 and of 4.

Prints a table and writes bench/results/batch_throughput-<machine>.md (no host name).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from flux_core.batch import load_jobs, run_batch, verify  # noqa: E402
from flux_core.batch.runner import EngineWorker, LocalBackend, ModelSpec  # noqa: E402
from machine import machine, machine_slug  # noqa: E402 (bench/ is the script's folder)

PROMPTS = ["a lighthouse on a cliff at dusk", "a bowl of oranges, oil painting", "a fox in fresh snow",
           "a city street in the rain at night", "a sailing boat on a calm lake", "a bee on a sunflower"]


def write_jobs(path: Path, images: int, image_size: int, steps: int, speed_mode: str) -> Path:
    per_prompt = max(1, images // len(PROMPTS))
    lines, left = [], images
    for n, prompt in enumerate(PROMPTS):
        count = min(per_prompt if n < len(PROMPTS) - 1 else left, left)
        if count <= 0:
            break
        lines.append(json.dumps({"prompt": prompt, "seed": 1000 * n, "variations": count, "image_size": image_size,
                                 "num_inference_steps": steps, "speed_mode": speed_mode}))
        left -= count
    path.write_text("\n".join(lines) + "\n")
    return path


class Stamps:
    """Commit times, from the backends' on_commit hook."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, backend, result):
        if result.error is None:
            self.times.append(time.perf_counter())


def measure(label: str, make_backend, jobs_file: Path, workdir: Path, threads: int | None = None) -> dict:
    """threads: torch threads of this process's engine for the run (None: leave as is)."""
    out = workdir / "".join(c if c.isalnum() else "_" for c in label)
    stamps = Stamps()
    backend = make_backend(stamps)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        summary = run_batch(load_jobs(jobs_file), out, backend, quiet=True)
    finally:
        torch.set_num_threads(before)
    wall = time.perf_counter() - start
    if summary.failed or verify(out):
        raise SystemExit(f"{label}: {summary.failed} failures, {verify(out)[:3]}")
    t = stamps.times
    # after the first generate() call (all images it made finish at once) up to the last image
    later = [x for x in t if x > t[0]]
    steady = 60.0 * len(later) / (t[-1] - t[0]) if later else float("nan")
    row = {"config": label, "images": summary.done, "steady": steady, "end_to_end": 60.0 * summary.done / wall,
           "wall_s": wall, "first_image_s": t[0] - start if t else float("nan")}
    print(f"{label:28s} {row['images']:3d} images  steady {steady:7.2f}/min  end to end {row['end_to_end']:7.2f}/min  "
          f"(first image after {row['first_image_s']:.1f}s, {wall:.1f}s in all)", flush=True)
    return row


def tiny_configs(args):
    from flux_core.batch.ray_runner import RayBackend

    spec = ModelSpec(demo=True, device="cpu")
    cores = os.cpu_count() or 1
    configs = [(f"engine, 1 worker x {threads} thread{'s' if threads > 1 else ''}",
                lambda hook: LocalBackend(spec, on_commit=hook), threads)
               for threads in sorted({cores, 1}, reverse=True)]
    for workers in args.workers:
        threads = max(1, cores // workers)  # RayBackend gives each actor its share of the CPUs as threads
        label = f"ray, {workers} worker{'s' if workers > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}"
        configs.append((label, lambda hook, w=workers: RayBackend(spec, workers=w, on_commit=hook), None))
    return configs


def full_models(depth: int, depth_single: int, device: str = "cuda"):
    """Full-size FLUX.1 [dev] transformer and autoencoder with random bf16 weights on the GPU, and the
    tiny demo text encoders (the transformer's text and vector projections take their width)."""
    from flux_core.autoencoder import FLUX_AE, AutoEncoder
    from flux_core.demo import TINY_FLUX, demo_model_files
    from flux_core.loaders import load_text_encoders
    from flux_core.model import FLUX_DEV, Flux
    from flux_core.pipeline import FluxModels

    params = FLUX_DEV.__class__(**{**FLUX_DEV.__dict__, "depth": depth, "depth_single_blocks": depth_single,
                                   "context_in_dim": TINY_FLUX.context_in_dim, "vec_in_dim": TINY_FLUX.vec_in_dim})
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: 12 B fp32 parameters would not fit first
    try:
        with torch.device(device):
            transformer = Flux(params).eval()
            autoencoder = AutoEncoder(FLUX_AE).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    for module in (transformer, autoencoder):  # default inits blow up over 57 blocks; keep activations sane
        for p in module.parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.02)
    files = demo_model_files()
    text = load_text_encoders(files["t5"], files["clip"], device=device, dtype=torch.bfloat16)
    return FluxModels(transformer, autoencoder, text), sum(p.numel() for p in transformer.parameters())


def full_configs(args):
    models, count = full_models(args.depth, args.depth_single, args.device)
    spec = ModelSpec(device=args.device, paths={"transformer": f"random full-size weights ({count / 1e9:.1f} B)"})
    worker = EngineWorker.from_models(models, spec, name="gpu")
    configs = [(f"engine, 1 GPU, batch {b}", lambda hook, b=b: LocalBackend(spec, batch_size=b, worker=worker,
                                                                             on_commit=hook), None)
               for b in args.batch_sizes]
    return configs, count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--images", type=int, default=None, help="images per configuration (24 tiny, 16 full)")
    parser.add_argument("--image-size", type=int, default=None, help="128 tiny, 1024 full")
    parser.add_argument("--steps", type=int, default=None, help="4 tiny, 28 full")
    parser.add_argument("--speed-mode", default="off", help="off is the plain reference sampler")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray worker counts (tiny model)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4], help="generate() batches (full model)")
    parser.add_argument("--depth", type=int, default=19, help="double blocks of the full model")
    parser.add_argument("--depth-single", type=int, default=38, help="single blocks of the full model")
    parser.add_argument("--device", default="cuda", help="device of the full model (cpu only to try the script)")
    parser.add_argument("--no-write", action="store_true", help="print only, no results file")
    args = parser.parse_args(argv)
    full = args.model == "full"
    if full and args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--model full needs a CUDA GPU")
    images = args.images or (16 if full else 24)
    size = args.image_size or (1024 if full else 128)
    steps = args.steps or (28 if full else 4)

    info = machine()
    workdir = Path(tempfile.mkdtemp(prefix="flux-batch-bench-"))
    try:
        jobs_file = write_jobs(workdir / "jobs.jsonl", images, size, steps, args.speed_mode)
        if full:
            configs, count = full_configs(args)
            model = (f"full-size transformer ({count / 1e9:.1f} B parameters, {args.depth} double + "
                     f"{args.depth_single} single blocks) and autoencoder, random bf16 weights; tiny demo text "
                     "encoders")
        else:
            configs = tiny_configs(args)
            model = "tiny demo model (flux_core.demo: hidden 256, 2 + 2 blocks; tiny autoencoder), float32"
        rows = [measure(label, make, jobs_file, workdir, threads) for label, make, threads in configs]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    device = info.get("gpu") or "CPU only"
    lines = [f"# Batch throughput: images per minute, {'full model on a GPU' if full else 'tiny model on the CPU'}", "",
             f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']:.1f} GiB RAM, {info['os']}; "
             f"Python {info['python']}, torch {info.get('torch')} ({info.get('threads')} threads), {device}.", "",
             f"Model: {model}. Jobs: {images} images in {min(len(PROMPTS), images)} jobs (variations of "
             f"fixed seeds), {size}x{size}, {steps} steps, speed mode {args.speed_mode}, jpg. Each configuration "
             "runs the real batch path (jobs file, manifest with fsync, atomic image files) into a fresh folder.", "",
             "*steady* counts the images finished after the first generate() call, over the time since (models "
             "loaded); *end to end* "
             "divides all images by the whole run, start-up included (Ray's local instance, model loading). A "
             "shared machine: other work ran beside it, so the numbers are noisy.", "",
             "| configuration | images | steady images/min | end to end images/min | first image after s | wall s |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['config']} | {r['images']} | {r['steady']:.1f} | {r['end_to_end']:.1f} | "
              f"{r['first_image_s']:.1f} | {r['wall_s']:.1f} |" for r in rows]
    command = "bench/batch_throughput.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(
        sys.argv[1:] if argv is None else argv))
    lines += ["", f"Command: `.venv/bin/python {command.strip()}`"]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if not args.no_write:
        target = ROOT / "bench" / "results" / f"batch_throughput-{machine_slug(info)}.md"
        target.write_text(text)
        print(f"wrote {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
