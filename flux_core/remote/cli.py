"""`python -m flux_core generate --provider NAME ...`: the generate command, run at a hosted provider."""
from __future__ import annotations

import os
import secrets
import sys

from .. import presets
from .api import generate_remote
from .errors import RemoteError
from .request import RANDOM_SEED_BITS

# Options of the local engine that mean nothing to a provider: attribute -> (flag, its default).
LOCAL_ONLY = {"models_dir": ("--models-dir", os.environ.get("FLUX_MODELS_DIR", "models")),
              "transformer": ("--transformer", None), "vae": ("--vae", None), "t5": ("--t5", None),
              "clip": ("--clip", None), "tokenizer_dir": ("--tokenizer-dir", None), "device": ("--device", None),
              "dtype": ("--dtype", None)}


def _progress_printer(provider: str, quiet: bool):
    state = {"text": None, "tenth": -1}

    def progress(fraction, text):
        if quiet:
            return
        tenth = int(fraction * 10) if fraction is not None else state["tenth"]
        if text != state["text"] or tenth != state["tenth"]:
            shown = f" {100 * fraction:.0f}%" if fraction is not None else ""
            print(f"{provider}: {text}{shown}", file=sys.stderr)
            state.update(text=text, tenth=tenth)

    return progress


def cmd_generate_remote(args) -> int:
    from ..image_files import format_from_path, save_image

    if args.demo:
        print("error: --demo runs the local engine on random weights; it does not go with --provider", file=sys.stderr)
        return 2
    if getattr(args, "lora", None):
        print("error: --lora runs on the local engine; it does not go with --provider", file=sys.stderr)
        return 2
    ignored = [flag for attr, (flag, default) in LOCAL_ONLY.items() if getattr(args, attr, default) != default]
    if ignored:
        print(f"note: {', '.join(ignored)} ignored: the job runs at {args.provider}", file=sys.stderr)
    try:
        output_format = args.output_format or format_from_path(args.out)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    image_size = args.image_size or presets.DEFAULT_IMAGE_SIZE
    base_seed = secrets.randbits(RANDOM_SEED_BITS) if args.seed == -1 else args.seed
    for i in range(max(1, args.num_images)):
        try:
            result = generate_remote(args.prompt, args.provider, aspect_ratio=args.aspect_ratio,
                                     speed_mode=args.speed_mode, num_inference_steps=args.steps,
                                     guidance=args.guidance, seed=base_seed + i, image_size=image_size,
                                     output_format=output_format, output_quality=args.output_quality,
                                     progress=_progress_printer(args.provider, args.quiet))
        except RemoteError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("cancelled", file=sys.stderr)
            return 130
        meta = result.metadata
        for item in meta["adjustments"]:
            print(f"note: {item['input']} {item['asked']!r}"
                  + (f" sent as {item['sent']!r}" if item["sent"] is not None else " not used")
                  + f": {item['why']}", file=sys.stderr)
        settings = {"prompt": args.prompt, **{k: v for k, v in meta["requested"].items() if k != "prompt"},
                    "seed": result.seed, "width": meta["width"], "height": meta["height"],
                    "provider": meta["provider"], "model": meta["model"], "task_id": meta["task_id"],
                    "adjustments": meta["adjustments"]}
        written = save_image(result.image, args.out, output_format, args.output_quality, metadata=settings)
        print(f"wrote {written} ({meta['width']}x{meta['height']}, seed {result.seed}, {meta['provider']} task "
              f"{meta['task_id']}, {meta['timings']['total_s']:.1f}s)")
    return 0
