"""`python -m flux_core batch`: the subcommand's options and what it runs (flux_core/cli.py hooks it in)."""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from pathlib import Path


def add_batch_parser(sub, add_model_arguments) -> None:
    b = sub.add_parser("batch", help="make many images from a jobs file (JSON lines), resumable",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Each line of the jobs file is a job: the inputs of `generate` (prompt, "
                                   "aspect_ratio, speed_mode, num_inference_steps, guidance, seed, image_size, "
                                   "output_format, output_quality), optional `loras` (\"FILE[:STRENGTH]\" or "
                                   "{\"name\", \"strength\"}; files beside the jobs file or in --models-dir/loras; "
                                   "ComfyUI: its loras folder) and `variations` (images per prompt). Images "
                                   "and manifest.jsonl go to --out; rerunning the command makes only what is "
                                   "missing. See docs/batch.md.")
    b.add_argument("jobs", help="the jobs file: one JSON object per line")
    b.add_argument("--out", required=True, help="output folder: images, manifest.jsonl, seeds.jsonl")
    b.add_argument("--batch-size", type=int, default=None,
                   help="images per generate() call for jobs of the same size and settings; "
                        "default 4 on a GPU, 1 on a CPU")
    b.add_argument("--comfyui", action="append", metavar="URL", default=[],
                   help="run the jobs on this ComfyUI server instead of the local engine (repeat for several)")
    b.add_argument("--workflow", default=None,
                   help="API-format workflow for --comfyui; default: the pack's workflows/api/flux_text_to_image.json")
    b.add_argument("--item-timeout", type=float, default=None, metavar="S",
                   help="with --comfyui: seconds an image may take on a server, queue wait included, before it "
                        "is taken off that server and counted failed (a rerun makes it); default 1800")
    b.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="a LoRA for every job whose line has no `loras` (repeat for several)")
    b.add_argument("--ray", action="store_true", help="run on Ray: a local Ray instance unless --ray-address")
    b.add_argument("--ray-address", default=None, help="join this Ray cluster (implies --ray), e.g. auto or HOST:6379")
    b.add_argument("--workers", type=int, default=None,
                   help="Ray workers (engine actors); default one per GPU of the cluster, else 1")
    add_model_arguments(b)
    from ..cli import add_memory_arguments

    add_memory_arguments(b)


def _backend(args, jobs):
    from .runner import LocalBackend, ModelSpec

    if args.comfyui:
        if args.ray or args.ray_address:
            raise ValueError("--comfyui and --ray do not go together: ComfyUI servers run the jobs themselves")
        from .comfy_client import DEFAULT_ITEM_TIMEOUT_S, ComfyBackend, check_lora_workflow, load_workflow

        workflow = load_workflow(args.workflow)
        if any(job.inputs["loras"] for job in jobs):
            check_lora_workflow(workflow)
        return ComfyBackend(args.comfyui, workflow,
                            item_timeout=DEFAULT_ITEM_TIMEOUT_S if args.item_timeout is None else args.item_timeout)
    if args.workflow:
        raise ValueError("--workflow is for --comfyui")
    if args.item_timeout is not None:
        raise ValueError("--item-timeout is for --comfyui")
    from .. import presets
    from ..cli import _model_paths, memory_kwargs

    dtype = {v: k for k, v in _torch_dtype_names().items()}.get(args.dtype) if args.dtype is not None else None
    # the memory plan is made for the largest image of the batch
    largest = max((presets.dimensions(j.inputs["aspect_ratio"], j.inputs["image_size"]) for j in jobs),
                  key=lambda wh: wh[0] * wh[1])
    common = dict(tokenizer_dir=args.tokenizer_dir, device=args.device, dtype=dtype, weights=args.weights,
                  memory=memory_kwargs(args, *largest),
                  lora_paths=found_loras(jobs, [Path(args.jobs).resolve().parent, Path(args.models_dir) / "loras"]))
    if args.demo:
        spec = ModelSpec(demo=True, **common)
    else:
        paths = _model_paths(args)
        # absolute, so Ray workers started in other folders (or on other nodes, at the same paths) find them
        spec = ModelSpec(paths={role: str(Path(p).resolve()) for role, p in paths.items()}, **common)
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1; got {args.batch_size}")
    if args.ray or args.ray_address:
        from .ray_runner import RayBackend

        return RayBackend(spec, workers=args.workers, address=args.ray_address, batch_size=args.batch_size)
    if args.workers is not None:
        raise ValueError("--workers is for --ray (this process runs one engine)")
    return LocalBackend(spec, batch_size=args.batch_size)


def found_loras(jobs, folders) -> dict[str, str]:
    """Every LoRA name the jobs use -> its file (absolute, so Ray workers elsewhere find it at the same path):
    the name as a path, else in each of `folders` in turn. ValueError naming what is missing, before any
    model is loaded."""
    found, missing = {}, []
    for name in sorted({lora["name"] for job in jobs for lora in job.inputs["loras"]}):
        candidates = [Path(name)] + [Path(folder) / name for folder in folders]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            missing.append(name)
        else:
            found[name] = str(path.resolve())
    if missing:
        raise ValueError(f"LoRA file{'s' if len(missing) > 1 else ''} not found: {', '.join(missing)} (looked "
                         f"as given and in {', '.join(str(f) for f in folders)})")
    return found


def _torch_dtype_names() -> dict:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@contextlib.contextmanager
def _sigterm_stops():
    """SIGTERM (a service manager, a pipeline's timeout) stops the batch as Ctrl-C does: cleanly."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except (ValueError, AttributeError):  # not the main thread, or no SIGTERM here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_batch(args) -> int:
    from ..cli import DEMO_IMAGE_SIZE
    from ..errors import FluxError
    from .driver import BatchError, run_batch
    from .files import FolderBusyError
    from .jobs import JobError, load_jobs
    from .manifest import ManifestError

    # --demo shrinks the default size as `generate --demo` does; ComfyUI servers bring their own models.
    defaults = {"image_size": DEMO_IMAGE_SIZE} if args.demo and not args.comfyui else {}
    if args.lora:  # for the jobs that name none; part of their fingerprints, so a change remakes them
        defaults["loras"] = list(args.lora)
    try:
        jobs = load_jobs(args.jobs, defaults=defaults)
        backend = _backend(args, jobs)
        if args.demo and not args.comfyui:
            print("DEMO: tiny random weights, the images will be noise. Real weights: see README.", file=sys.stderr)
        with _sigterm_stops():
            summary = run_batch(jobs, args.out, backend, quiet=args.quiet)
    except (JobError, BatchError, ManifestError, FolderBusyError, FluxError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{summary.done} images written to {Path(args.out)} ({summary.skipped} were already there, "
          f"{summary.failed} failed); manifest: {Path(args.out) / 'manifest.jsonl'}")
    if summary.interrupted:
        return 130
    return 1 if summary.failed else 0
