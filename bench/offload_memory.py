"""Peak device memory and time per step of the low-memory pipeline (block streaming + T5 policy).

    .venv/bin/python bench/offload_memory.py                      # CUDA: full-size FLUX.1 [dev], 8 / 24 GiB / no budget
    .venv/bin/python bench/offload_memory.py --budgets 8 --steps 28 --image-size 1024
    .venv/bin/python bench/offload_memory.py --size small         # the CPU smoke (default without CUDA)

Each configuration runs in a fresh subprocess: random weights with the real shapes (12B transformer in
bf16, T5-XXL bf16, CLIP-L bf16, the autoencoder in float32, as load_models loads them by default), the
memory plan for the budget, then generate() at 28 steps: the product path, with the plan's T5 policy,
streamed blocks and decode. Tokenizers are stand-ins that return fixed token ids (no files needed).
Reported: the plan, its estimated peak, the measured peak (torch.cuda.max_memory_allocated and
max_memory_reserved; "card" adds what the CUDA context holds, from cudaMemGetInfo), seconds per step
(median), encode and decode seconds, and whether the latents equal the no-budget run's bit for bit.
See bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine, machine_slug  # noqa: E402 (bench/ is the script's folder)

ROOT = Path(__file__).resolve().parent.parent
GIB = 2 ** 30


# ------------------------------------------------------------------------------------------------
# inside the child


class _Ids:
    """Stand-in tokenizer: the same fixed ids for every prompt."""

    def __init__(self, length: int, vocab: int, eos: int | None, seed: int):
        import torch

        self.max_length = length
        ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))
        if eos is not None:
            ids[0, length // 2:] = eos  # CLIP pools the first end-of-text token
        self.ids = ids

    def __call__(self, prompts):
        return self.ids.expand(len(prompts), -1).clone()


def _fill_random(module, device, seed: int):
    """Random values scaled like trained weights (N(0, 1/fan_in) matrices, norm scales near 1)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                v = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * p[0].numel() ** -0.5
            elif "norm" in name or name.endswith("scale"):
                v = 1 + 0.1 * torch.randn(p.shape, generator=gen, device=device)
            else:
                v = 0.02 * torch.randn(p.shape, generator=gen, device=device)
            p.copy_(v)
    return module


def _build(size: str, dtype, ae_dtype):
    import torch

    from flux_core.autoencoder import FLUX_AE, TINY_AE, AutoEncoder
    from flux_core.model import FLUX_DEV, Flux, FluxParams
    from flux_core.pipeline import FluxModels
    from flux_core.text_encoders import CLIP_L, T5_XXL, TINY_CLIP, TINY_T5, CLIPTextModel, T5Encoder, TextEncoders
    from flux_core.text_encoders.tokenization import Tokenizers

    if size == "full":
        configs = FLUX_DEV, T5_XXL, CLIP_L, FLUX_AE
    else:
        configs = (FluxParams(hidden_size=256, num_heads=2, depth=2, depth_single_blocks=4, context_in_dim=64,
                              vec_in_dim=64), TINY_T5, TINY_CLIP, TINY_AE)
    fp, t5c, clipc, aec = configs
    fill = "cuda" if torch.cuda.is_available() else "cpu"  # random numbers are made on the GPU when there is one
    parts = []
    for i, (cls, cfg, dt) in enumerate(((Flux, fp, dtype), (T5Encoder, t5c, dtype), (CLIPTextModel, clipc, dtype),
                                        (AutoEncoder, aec, ae_dtype))):
        with torch.device("meta"):
            m = cls(cfg)
        m = m.to(dt).to_empty(device="cpu").eval().requires_grad_(False)  # dtype first: no float32 copy
        parts.append(_fill_random(m, fill, seed=i))
    flux, t5, clip, ae = parts
    toks = Tokenizers(_Ids(512 if size == "full" else 32, t5c.vocab_size, None, 1),
                      _Ids(clipc.max_positions, clipc.vocab_size, clipc.eos_token_id, 2))
    return FluxModels(flux, ae, TextEncoders(t5, clip, toks, device="cpu", dtype=dtype))


def child(cfg: dict) -> dict:
    import torch

    from flux_core.pipeline import generate
    from flux_core.speed.memory_plan import plan_memory, sizes_of
    from flux_core.speed.placement import MemoryManager

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    start = time.perf_counter()
    models = _build(cfg["size"], dtype, torch.float32)
    built_s = time.perf_counter() - start
    enc = models.text_encoders
    sizes = sizes_of(models.transformer, enc.t5, enc.clip, models.autoencoder)
    plan = plan_memory(sizes, cfg["budget"], width=cfg["image_size"], height=cfg["image_size"],
                       offload=cfg["offload"], t5_policy=cfg["t5_policy"])
    if plan.t5_policy == "free":
        raise SystemExit("the benchmark's T5 has no file to reload from: use keep, offload or cpu")
    start = time.perf_counter()
    models.memory = MemoryManager(models, device, plan)
    place_s = time.perf_counter() - start
    kw = dict(image_size=cfg["image_size"], seed=3, speed_mode="off")
    generate("warm-up", models, num_inference_steps=1, **kw)  # kernels, slots, allocator pools
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    stamps, card = [], []

    def on_step(info):
        if cuda:
            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            card.append(total - free)
        stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    result = generate("a juicy orange", models, num_inference_steps=cfg["steps"], callback=on_step, **kw)
    steps = [b - a for a, b in zip([t0 + result.timings["encode_s"]] + stamps[:-1], stamps)]
    out = {"plan": plan.describe(), "resident_blocks": plan.resident_blocks, "total_blocks": plan.total_blocks,
           "t5_policy": plan.t5_policy, "vae_tile": plan.vae_tile, "estimated_peak_gib": plan.peak_bytes / GIB,
           "estimated_phases_gib": {k: v / GIB for k, v in plan.phases.items()},
           "step_s_median": statistics.median(steps), "step_s_first": steps[0],
           "encode_s": result.timings["encode_s"], "decode_s": result.timings["decode_s"],
           "total_s": time.perf_counter() - t0, "build_s": built_s, "place_s": place_s,
           "host_streamed_gib": plan.host_bytes / GIB}
    if cuda:
        free, total = torch.cuda.mem_get_info()
        out.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB,
                   card_used_max_gib=max(card + [total - free]) / GIB, card_gib=total / GIB)
    torch.save(result.latents.cpu(), cfg["latents"])
    return out


# ------------------------------------------------------------------------------------------------
# the parent


def _run(cfg: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True,
                          cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"configuration {cfg} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(v, unit=""):
    return "n/a" if v is None else f"{v:.2f}{unit}"


def _same(flag) -> str:
    return "n/a" if flag is None else ("yes" if flag else "NO")


def _row(r: dict) -> str:
    cells = [r["budget"] if r["budget"] is not None else "none", r["offload"],
             f"{r['resident_blocks']}/{r['total_blocks']}", r["t5_policy"],
             "whole" if r["vae_tile"] is None else f"{r['vae_tile'] * 8}px tiles", f"{r['estimated_peak_gib']:.2f}",
             _fmt(r.get("peak_allocated_gib")), _fmt(r.get("peak_reserved_gib")), _fmt(r.get("card_used_max_gib")),
             f"{r['step_s_median']:.3f}", f"{r['encode_s']:.2f}", f"{r['decode_s']:.2f}", f"{r['total_s']:.1f}",
             _same(r["same_latents"])]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument("--size", choices=("full", "small"), default="full" if cuda else "small")
    ap.add_argument("--budgets", default="8,24,none" if cuda else "none",
                    help="comma-separated GiB budgets; none = no budget (everything resident on CUDA)")
    ap.add_argument("--offload", default="auto", choices=("none", "blocks", "auto"))
    ap.add_argument("--t5-policy", default="auto", choices=("auto", "keep", "offload", "cpu"))
    ap.add_argument("--image-size", type=int, default=1024 if cuda else 64)
    ap.add_argument("--steps", type=int, default=28 if cuda else 3)
    ap.add_argument("--out", default=None,
                    help="result file (default on CUDA: bench/results/offload_memory-<gpu>.md; the CPU smoke "
                         "writes none unless asked)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    budgets = [None if b.strip() == "none" else float(b) for b in args.budgets.split(",")]
    if cuda:  # no budget = everything resident: the reference the streamed runs must equal
        runs = [(b, "none", "keep") if b is None else (b, args.offload, args.t5_policy)
                for b in sorted(budgets, key=lambda b: b is not None)]
    else:  # the CPU smoke: a plain run, then the same with every block and the T5 streamed
        runs = [(None, "none", "keep"), (None, "blocks", "offload" if args.t5_policy == "auto" else args.t5_policy)]
    rows, tmp, reference = [], Path(tempfile.mkdtemp(prefix="offload_bench_")), None
    for i, (budget, offload, t5_policy) in enumerate(runs):
        cfg = {"size": args.size, "budget": budget, "offload": offload, "t5_policy": t5_policy,
               "image_size": args.image_size, "steps": args.steps, "latents": str(tmp / f"{i}.pt")}
        print(f"running {cfg} ...", file=sys.stderr, flush=True)
        res = _run(cfg)
        latents = torch.load(cfg["latents"])
        if offload == "none" and reference is None:
            reference = latents
        res.update(budget=budget, offload=offload,
                   same_latents=None if reference is None else bool(torch.equal(latents, reference)))
        rows.append(res)
        print(res["plan"], file=sys.stderr)

    m = machine()
    head = ("| budget GiB | offload | resident blocks | T5 | VAE | est. peak GiB | peak alloc GiB | peak reserved GiB | "
            "card used GiB | s/step (median) | encode s | decode s | total s | latents = no-budget run |")
    lines = [f"# offload_memory: {args.size} model, {args.image_size}x{args.image_size}, {args.steps} steps", "",
             "Machine: " + ", ".join(f"{k} {round(v, 1) if isinstance(v, float) else v}" for k, v in m.items()),
             "",
             f"Command: `.venv/bin/python bench/offload_memory.py --size {args.size} --budgets {args.budgets} "
             f"--image-size {args.image_size} --steps {args.steps}`", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    lines += [_row(r) for r in rows]
    lines += ["", "Plans:", ""] + [f"```\n{r['plan']}\n```" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.out and not cuda:
        return 0 if all(r["same_latents"] is not False for r in rows) else 1
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"offload_memory-{machine_slug(m)}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}", file=sys.stderr)
    return 0 if all(r["same_latents"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
