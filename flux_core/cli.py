"""Command line: `python -m flux_core generate --prompt ... --out image.jpg`."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import presets

DEMO_IMAGE_SIZE = 256


def _dtype(name: str):
    import torch

    try:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    except KeyError:
        raise argparse.ArgumentTypeError("dtype must be bf16, fp16 or fp32") from None


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model-file, device and demo options shared by every command that runs the engine."""
    p.add_argument("--models-dir", default=os.environ.get("FLUX_MODELS_DIR", "models"),
                   help="a ComfyUI-style models folder (diffusion_models/, text_encoders/, vae/); env FLUX_MODELS_DIR")
    p.add_argument("--transformer", help="transformer file or diffusers folder (overrides --models-dir)")
    p.add_argument("--vae", help="autoencoder file or folder")
    p.add_argument("--t5", help="T5-XXL file or folder")
    p.add_argument("--clip", help="CLIP-L file or folder")
    p.add_argument("--tokenizer-dir", help="folder with the T5 and CLIP tokenizer files (found automatically "
                                           "inside ComfyUI and in this project's host copy)")
    p.add_argument("--device", default=None, help="cuda, cpu, mps, ...; default: cuda if available")
    p.add_argument("--dtype", type=_dtype, default=None, help="bf16, fp16 or fp32; default bf16 on GPUs, fp32 on the CPU")
    p.add_argument("--weights", choices=("auto", "dense", "int8", "fp8"), default="auto",
                   help="transformer weight storage: auto keeps GGUF files quantized and the rest in --dtype; "
                        "int8/fp8 store the block weights 8-bit (per-row scales, about half of bf16); dense "
                        "expands everything to --dtype (docs/low_memory.md)")
    p.add_argument("--demo", action="store_true",
                   help="tiny random weights, no downloads: shows the whole path working; the image is noise")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_memory_arguments(p: argparse.ArgumentParser) -> None:
    """Low-memory options (docs/low_memory.md); memory_kwargs(args) turns them into load_models keywords."""
    p.add_argument("--offload", choices=("none", "blocks", "auto"), default="auto",
                   help="stream transformer blocks from CPU memory through the GPU: auto = only when the "
                        "budget needs it; blocks = always (as few as the budget allows); none = never")
    p.add_argument("--vram-budget", type=float, default=None, metavar="GB",
                   help="GPU memory the pipeline may use, in GiB as nvidia-smi counts (default: the whole "
                        "card); 0.75 of it is left for the CUDA context")
    p.add_argument("--t5-policy", choices=("auto", "keep", "offload", "cpu", "free"), default="auto",
                   help="T5-XXL (9.5 GB): keep on the GPU, offload (CPU memory, streamed through the GPU to "
                        "encode), cpu (encode on the CPU), free (offload, then drop it; reloaded per prompt); "
                        "auto = keep when everything fits, else offload")


def memory_kwargs(args, width: int, height: int) -> dict:
    return {"offload": args.offload, "vram_budget_gb": args.vram_budget, "t5_policy": args.t5_policy,
            "plan_size": (width, height)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flux_core", description="FLUX.1 [dev] engine")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="make images from a prompt",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("--prompt", required=True, help="what to draw")
    g.add_argument("--out", default="image.jpg",
                   help="output file; its suffix (.jpg .png .webp) picks the format; never overwritten")
    g.add_argument("--aspect-ratio", default=presets.DEFAULT_ASPECT_RATIO, choices=presets.ASPECT_RATIOS)
    g.add_argument("--image-size", type=int, default=None,
                   help=f"longest side in pixels ({presets.IMAGE_SIZE_RANGE[0]}-{presets.IMAGE_SIZE_RANGE[1]}); "
                        f"default {presets.DEFAULT_IMAGE_SIZE}, {DEMO_IMAGE_SIZE} with --demo")
    g.add_argument("--speed-mode", default="extra-juiced",
                   help="off (exact reference), lightly-juiced, juiced, extra-juiced or blink: step caching with "
                        "at most 15/12/9/6 full transformer evaluations at 28 steps; the full names work too")
    g.add_argument("--num-inference-steps", "--steps", type=int, default=presets.DEFAULT_STEPS, dest="steps")
    g.add_argument("--guidance", type=float, default=presets.DEFAULT_GUIDANCE, help="distilled guidance (not CFG)")
    g.add_argument("--seed", type=int, default=-1, help="-1 picks a random seed (the seed used is printed)")
    g.add_argument("--num-images", type=int, default=1, help="variations: image i uses seed + i")
    g.add_argument("--output-format", choices=presets.OUTPUT_FORMATS, default=None,
                   help="overrides the format implied by --out")
    g.add_argument("--output-quality", type=int, default=presets.DEFAULT_OUTPUT_QUALITY, help="1-100, jpg/webp")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="a LoRA for the transformer and CLIP-L (.safetensors; kohya, diffusers/PEFT, OneTrainer, "
                        "XLabs or reference key names), strength default 1.0; repeat for several")
    add_model_arguments(g)
    add_memory_arguments(g)
    g.add_argument("--provider", default=None, metavar="NAME",
                   help="run the job at a hosted provider instead: inference.sh, bfl, fal, replicate or cometapi "
                        "(key from the environment; model-file and device options do not apply; docs/remote.md)")
    from .batch.command import add_batch_parser  # the batch subcommand lives with its package

    add_batch_parser(sub, add_model_arguments)
    return parser


def _model_paths(args) -> dict:
    from .model_files import find_model_files, missing_files_message

    if args.demo:
        from .demo import demo_model_files

        files = demo_model_files()
        return dict(files, autoencoder=files["tiny_autoencoder"])
    found = find_model_files(args.models_dir)
    explicit = {"transformer": args.transformer, "autoencoder": args.vae, "t5": args.t5, "clip": args.clip}
    paths = {role: Path(explicit[role]) if explicit[role] else found[role] for role in explicit}
    missing = [role for role, p in paths.items() if p is None]
    if missing:
        raise SystemExit(missing_files_message(args.models_dir, missing))
    return paths


def cmd_generate(args) -> int:
    import torch

    from .errors import FluxError
    from .image_files import save_image
    from .lora import parse_lora_spec
    from .pipeline import generate, load_models
    from .progress import ProgressBar
    from .speed import presets as speed_presets

    if args.image_size is None:
        args.image_size = DEMO_IMAGE_SIZE if args.demo else presets.DEFAULT_IMAGE_SIZE
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or (torch.float32 if device == "cpu" else torch.bfloat16)  # CPUs are slow at bf16
    output_format = args.output_format
    if output_format is None:
        from .image_files import format_from_path

        output_format = format_from_path(args.out)
    try:
        presets.check_range("output_quality", args.output_quality, presets.QUALITY_RANGE)
        speed_presets.resolve(args.speed_mode)  # refuse a bad name before loading 12B parameters
        paths = _model_paths(args)
        if args.demo:
            print("DEMO: tiny random weights, the image will be noise. Real weights: see README.", file=sys.stderr)
        models = load_models(paths["transformer"], paths["autoencoder"], paths["t5"], paths["clip"],
                             tokenizer_dir=args.tokenizer_dir, device=device, dtype=dtype, weights=args.weights,
                             **memory_kwargs(args, *presets.dimensions(args.aspect_ratio, args.image_size)))
        if models.memory is not None and models.memory.plan.budget_gib is not None and not args.quiet:
            print(models.memory.plan.describe(), file=sys.stderr)
        bar = None if args.quiet else ProgressBar(args.steps, label="sampling")
        result = generate(args.prompt, models, aspect_ratio=args.aspect_ratio, image_size=args.image_size,
                          num_inference_steps=args.steps, guidance=args.guidance, seed=args.seed,
                          num_images=args.num_images, speed_mode=args.speed_mode,
                          loras=[parse_lora_spec(spec) for spec in args.lora],
                          callback=(lambda info: bar.update(info.step)) if bar else None)
    except (FluxError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for image, seed, prompt in zip(result.images, result.seeds, result.prompts):
        metadata = {"prompt": prompt, **result.settings, "seed": seed, "demo": bool(args.demo),
                    "model": "flux1-dev (demo random weights)" if args.demo else str(paths["transformer"].name)}
        written = save_image(image, args.out, output_format, args.output_quality, metadata=metadata)
        print(f"wrote {written} ({result.width}x{result.height}, seed {seed}, "
              f"{result.evaluations} transformer evaluations, {result.timings['total_s']:.1f}s)")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate" and args.provider:
        from .remote.cli import cmd_generate_remote

        return cmd_generate_remote(args)
    if args.command == "generate":
        return cmd_generate(args)
    if args.command == "batch":
        from .batch.command import cmd_batch

        return cmd_batch(args)
    return 1
