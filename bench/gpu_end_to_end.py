"""End to end on a GPU: prompt -> image at 1024x1024, 28 steps, guidance 3.5, random full-size weights.

    python bench/gpu_end_to_end.py                          # on a CUDA machine: full 12B model, every row
    .venv/bin/python bench/gpu_end_to_end.py --size tiny    # the same script at a tiny size on the CPU (a smoke)

Rows, side by side in one process, interleaved per round:
* flux_core bf16 eager (speed_mode off: the reference computation) and each of the four speed modes (step
  caching + the runtime choices for this GPU: compile, fp8, attention, reported per row);
* diffusers FluxPipeline (its own T5 / CLIP / VAE / scheduler, default attention);
* ComfyUI's FLUX transformer (comfy.ldm.flux.model.Flux, its own attention choice) inside flux_core's text
  encoding, Euler loop and decoding: the host's transformer, not its whole sampler.

Every row encodes the prompt, denoises and decodes to a PIL image. Random weights are made directly on the
device in bf16 (no files); the transformers of all rows share one set of weight tensors (bench/peers.py),
each speed mode's fp8 copy comes on top. Time: median of --repeat timed runs after one untimed warm-up run
per row (which includes compilation; its time is listed). Peak VRAM per row: the bytes of that row's own
weights plus the peak of what the run allocated beyond what was allocated before it.

Random weights cannot judge images; this measures speed and memory only.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402  (puts the repository root and tests/ on sys.path)
from machine import machine, machine_slug  # noqa: E402

import flux_core  # noqa: E402
from flux_core.autoencoder import FLUX_AE, TINY_AE, AutoEncoder  # noqa: E402
from flux_core.demo import TINY_FLUX  # noqa: E402
from flux_core.model import FLUX_DEV  # noqa: E402
from flux_core.pipeline import FluxModels  # noqa: E402
from flux_core.speed import presets  # noqa: E402
from flux_core.speed.runtime import current  # noqa: E402
from flux_core.text_encoders.clip import CLIP_L, TINY_CLIP, CLIPTextModel, heads_for  # noqa: E402
from flux_core.text_encoders.encoders import TextEncoders  # noqa: E402
from flux_core.text_encoders.t5 import T5_XXL, TINY_T5, T5Encoder  # noqa: E402
from flux_core.text_encoders.tokenization import find_tokenizer_folders, load_tokenizers  # noqa: E402

ROOT = peers.ROOT
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
SIZES = {"full": (FLUX_DEV, T5_XXL, CLIP_L, FLUX_AE), "tiny": (TINY_FLUX, TINY_T5, TINY_CLIP, TINY_AE)}


# ------------------------------------------------------------------------------------------------
# random modules, made on the device


@torch.no_grad()
def randomize_(module: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    """Fill every floating parameter: matrices and kernels ~ N(0, 1/fan_in), norm weights 1 + N(0, 0.1^2),
    the rest N(0, 0.1^2). Integer buffers (position ids) are left as the constructor made them."""
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if not t.is_floating_point():
            continue
        if t.ndim >= 2:
            t.normal_(0.0, 1.0 / math.sqrt(t[0].numel()), generator=gen)
        elif "norm" in name and (name.endswith("weight") or name.endswith("scale")):
            t.normal_(1.0, 0.1, generator=gen)
        else:
            t.normal_(0.0, 0.1, generator=gen)
    return module


def build(cls_or_fn, device, dtype, gen):
    """A module made on the meta device in `dtype`, then given storage on `device` and random values (no
    float32 copy on the way: T5-XXL alone would take 19 GB for a moment)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            module = cls_or_fn()
    finally:
        torch.set_default_dtype(previous)
    module = module.to_empty(device=device)
    return randomize_(module, gen).eval().requires_grad_(False)


def ours(size: str, device, dtype, gen):
    flux_p, t5_c, clip_c, ae_p = SIZES[size]
    sd = peers.random_bfl_state_dict(flux_p, seed=0, device=device, dtype=dtype)
    t5 = build(lambda: T5Encoder(t5_c), device, dtype, gen)
    clip = build(lambda: CLIPTextModel(clip_c), device, dtype, gen)
    ae = build(lambda: AutoEncoder(ae_p), device, dtype, gen)
    encoders = TextEncoders(t5, clip, load_tokenizers(None, 512, clip_c.max_positions), device=device, dtype=dtype)
    return flux_p, sd, encoders, ae


def diffusers_pipeline(size: str, sd: dict, device, dtype):
    """diffusers' FluxPipeline with the shared transformer weights and its own random T5, CLIP and VAE."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel as HFCLIP, CLIPTokenizer, T5Config, T5EncoderModel
    from transformers import T5TokenizerFast

    flux_p, t5_c, clip_c, ae_p = SIZES[size]
    t5_dir, clip_dir = find_tokenizer_folders(None)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made straight in bf16 on the device: no fp32 copy of 4.7 B parameters
    try:
        with torch.device(device):
            t5 = T5EncoderModel(T5Config(
                vocab_size=t5_c.vocab_size, d_model=t5_c.d_model, d_kv=t5_c.d_kv, d_ff=t5_c.d_ff,
                num_layers=t5_c.num_layers, num_heads=t5_c.num_heads, feed_forward_proj="gated-gelu",
                relative_attention_num_buckets=t5_c.num_buckets, relative_attention_max_distance=t5_c.max_distance))
            clip = HFCLIP(CLIPTextConfig(
                vocab_size=clip_c.vocab_size, hidden_size=clip_c.hidden_size, intermediate_size=clip_c.intermediate_size,
                num_hidden_layers=clip_c.num_layers, num_attention_heads=heads_for(clip_c.hidden_size),
                max_position_embeddings=clip_c.max_positions, hidden_act="quick_gelu", projection_dim=clip_c.hidden_size))
            channels = [ae_p.ch * m for m in ae_p.ch_mult]
            vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=ae_p.z_channels,
                                down_block_types=("DownEncoderBlock2D",) * len(channels),
                                up_block_types=("UpDecoderBlock2D",) * len(channels), block_out_channels=channels,
                                layers_per_block=ae_p.num_res_blocks, scaling_factor=ae_p.scale_factor,
                                shift_factor=ae_p.shift_factor, use_quant_conv=False, use_post_quant_conv=False)
    finally:
        torch.set_default_dtype(previous)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    transformer = peers.diffusers_model(sd, flux_p)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=clip.eval(),
                        tokenizer=CLIPTokenizer.from_pretrained(str(clip_dir), model_max_length=clip_c.max_positions),
                        text_encoder_2=t5.eval(),
                        tokenizer_2=T5TokenizerFast.from_pretrained(str(t5_dir)), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe, [transformer, t5, clip, vae]


class ComfyTransformer:
    """ComfyUI's Flux behind the call signature flux_core's sampling loop uses."""

    def __init__(self, handle, device, dtype):
        self.handle, self.device, self.dtype = handle, torch.device(device), dtype

    def __call__(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        return peers.run_comfy(self.handle, dict(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids,
                                                 timesteps=timesteps, y=y, guidance=guidance))


# ------------------------------------------------------------------------------------------------
# measuring


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes(*modules) -> int:
    """Bytes of the distinct storages behind these modules' parameters and buffers."""
    seen, total = set(), 0
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def timed(fn, device):
    """(fn's result, seconds, peak bytes allocated beyond what was allocated before; None off CUDA)."""
    cuda = torch.device(device).type == "cuda"
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    seconds = time.perf_counter() - start
    return result, seconds, (torch.cuda.max_memory_allocated(device) - before) if cuda else None


@dataclasses.dataclass
class Row:
    name: str
    run: object           # () -> result
    modules: list         # whose weights count for this row
    model: object = None  # the flux_core transformer, for its runtime report
    times: list = dataclasses.field(default_factory=list)
    peaks: list = dataclasses.field(default_factory=list)
    warmup: float = 0.0
    last: object = None


def flux_core_run(models, image_size, args, mode):
    return lambda: flux_core.generate(PROMPT, models, image_size=image_size, num_inference_steps=args.steps,
                                      guidance=args.guidance, seed=0, speed_mode=mode)


def make_rows(args, device, dtype, image_size) -> tuple[list[Row], dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    flux_p, sd, encoders, ae = ours(args.size, device, dtype, gen)
    wanted = set(args.rows or ["eager", "lightly", "juiced", "extra", "blink", "diffusers", "comfyui"])
    rows, skipped, fp8_model = [], {}, None
    for key, mode in (("eager", None), ("lightly", presets.LIGHTLY_JUICED), ("juiced", presets.JUICED),
                      ("extra", presets.EXTRA_JUICED), ("blink", presets.BLINK)):
        if key not in wanted:
            continue
        fp8 = mode is not None and presets.MODES[mode].precision == "fp8"
        model = fp8_model if fp8 and fp8_model is not None else peers.ours(sd, flux_p)
        if fp8:
            fp8_model = model  # one fp8 copy of the weights serves the three fp8 modes
        run = flux_core_run(FluxModels(model, ae, encoders), image_size, args, mode)
        rows.append(Row(f"flux_core {mode or 'bf16 eager'}", run, [model, ae, encoders.t5, encoders.clip], model))
    if "diffusers" in wanted:
        try:
            pipe, parts = diffusers_pipeline(args.size, sd, device, dtype)
            run = lambda: pipe(PROMPT, height=image_size, width=image_size, num_inference_steps=args.steps,  # noqa: E731
                               guidance_scale=args.guidance, generator=torch.Generator(device).manual_seed(0),
                               max_sequence_length=512, output_type="pil").images
            rows.append(Row("diffusers FluxPipeline", run, parts))
        except ImportError as error:
            skipped["diffusers FluxPipeline"] = f"not installed ({error})"
    if "comfyui" in wanted:
        try:  # the tests' importer forces ComfyUI's CPU mode, whose attention pick (sub-quadratic) would not
            # be ComfyUI's on a GPU: there it picks PyTorch SDPA, so that one is used on CUDA
            handle = peers.comfy_model(sd, flux_p, "pytorch" if device.type == "cuda" else "default")
        except BaseException as error:  # tests/comfy_import fails through pytest.fail when ComfyUI is missing
            if isinstance(error, KeyboardInterrupt):
                raise
            skipped["ComfyUI Flux transformer"] = f"ComfyUI not importable ({str(error).splitlines()[0][:120]})"
        else:
            models = FluxModels(ComfyTransformer(handle, device, dtype), ae, encoders)
            rows.append(Row(f"ComfyUI Flux transformer ({handle[2].__name__})",
                            flux_core_run(models, image_size, args, None), [handle[0], ae, encoders.t5, encoders.clip]))
    return rows, skipped


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=None, help="default 1024 (full), 128 (tiny)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per row after the warm-up")
    parser.add_argument("--rows", nargs="+", default=None, help="subset of: eager lightly juiced extra blink "
                        "diffusers comfyui")
    parser.add_argument("--out", default=None, help="results file (default: bench/results/gpu_end_to_end-"
                        "<gpu>.md for --size full, none for tiny)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), torch.bfloat16
    image_size = args.image_size or (1024 if args.size == "full" else 128)
    rows, skipped = make_rows(args, device, dtype, image_size)

    for row in rows:
        row.last, row.warmup, _ = timed(row.run, device)
        print(f"warm-up {row.name}: {row.warmup:.2f} s", flush=True)
    for round_ in range(args.repeat):
        for row in rows:
            row.last, seconds, peak = timed(row.run, device)
            row.times.append(seconds)
            row.peaks.append(peak)
        print(f"round {round_ + 1}: " + ", ".join(f"{r.name} {r.times[-1]:.2f} s" for r in rows), flush=True)

    table = []
    for row in rows:
        evals, note = args.steps, "its own attention and kernels"
        if row.model is not None:
            report = current(row.model)
            evals = row.last.evaluations
            note = (f"attention {report.attention.name}, compile {'on' if report.compile.enabled else 'off'}, "
                    f"precision {report.precision.name}") if report else "no runtime (the reference computation)"
        weights = weight_bytes(*row.modules)
        peaks = [p for p in row.peaks if p is not None]
        table.append({"name": row.name, "median": statistics.median(row.times), "warmup": row.warmup, "evals": evals,
                      "weights_gib": weights / 2**30, "peak_gib": (weights + max(peaks)) / 2**30 if peaks else None,
                      "note": note})
    for r in table:
        peak = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "n/a (CPU)"
        print(f"{r['name']:44s} {r['median']:8.2f} s  warm-up {r['warmup']:7.1f} s  evals {r['evals']:2d}  "
              f"peak {peak}  ({r['note']})")
    for name, why in skipped.items():
        print(f"{name:44s} skipped: {why}")
    out = args.out or (None if args.size == "tiny" else
                       str(ROOT / "bench" / "results" / f"gpu_end_to_end-{machine_slug(machine())}.md"))
    if out:
        write(out, args, image_size, table, skipped)


def write(out, args, image_size, table, skipped):
    m = machine()
    base = next((r["median"] for r in table if r["name"] == "flux_core bf16 eager"), None)
    lines = [
        "# End to end on a GPU: prompt to image, random full-size weights" if args.size == "full" else
        "# End to end, tiny smoke run",
        "",
        f"Device: {m.get('gpu', m['cpu'])}; torch {m['torch']}. Model size: {args.size}. {image_size}x{image_size}, "
        f"{args.steps} steps, guidance {args.guidance}, bf16, prompt {PROMPT!r}. Time: text encoding + denoising + "
        f"decoding to a PIL image, median of {args.repeat} runs after one untimed warm-up (listed; it includes "
        f"compilation). Peak VRAM: the row's own weights + the most it allocated during a run. Random weights: "
        f"speed and memory only, no image quality.",
        "",
        "| row | median s | vs bf16 eager | warm-up s | full evaluations | weights GiB | peak VRAM GiB | runtime |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in table:
        ratio = f"{base / r['median']:.2f}x" if base else ""
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"
        lines.append(f"| {r['name']} | {r['median']:.2f} | {ratio} | {r['warmup']:.1f} | {r['evals']} | "
                     f"{r['weights_gib']:.1f} | {peak} | {r['note']} |")
    for name, why in skipped.items():
        lines.append(f"| {name} | skipped: {why} | | | | | | |")
    lines += ["", f"Command: `python bench/gpu_end_to_end.py {' '.join(sys.argv[1:])}`", ""]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
