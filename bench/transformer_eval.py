"""Time per transformer evaluation on the CPU: flux_core against diffusers and ComfyUI on the same weights.

    .venv/bin/python bench/transformer_eval.py                    # fp32 and bf16, 3 rounds, ~30 min on 2 busy cores
    .venv/bin/python bench/transformer_eval.py --dtypes fp32 --repeat 5

One mid-size random FLUX transformer (hidden 1536 = 12 heads of 128, 4 double + 8 single blocks, real T5 and
CLIP widths, ~0.6 B parameters), one 512x512 image (1024 image tokens) with 512 text tokens, batch 1. Every
implementation gets the very same weight tensors (bench/peers.py), the same inputs and the same threads, in
one process. Rounds are interleaved (each round runs every implementation once, in turn), so load from
other processes hits all alike; the median of the rounds is reported, after one untimed warm-up call each.

Rows:
* diffusers FluxTransformer2DModel (its default SDPA attention processor);
* ComfyUI's comfy.ldm.flux.model.Flux with the attention function ComfyUI picks on a CPU (sub-quadratic) and
  with its PyTorch SDPA one (--use-pytorch-cross-attention);
* flux_core as loaded (eager, no runtime), flux_core with the runtime every speed mode applies on this
  machine (speed.runtime.accelerate; compile "auto"), and with compile forced on;
* the floor: only the matrix products every implementation must compute (each Linear of one evaluation, on
  inputs of the shapes it saw, and one SDPA per block), without norms, modulation, rotary embedding or
  activations. No implementation of the same arithmetic can be faster than this row, so its ratio is the
  best ratio reachable here.

Ratio = flux_core time / the faster peer's time (goal: at most 0.8). Also printed: max |output - diffusers|
relative to max |diffusers|, to show every row computes the same function.

Writes bench/results/transformer_eval-<cpu>-<cores>cores-<ram>gib.md (no host name).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning, so process CPU time counts work, not waiting (the same
# setting for every implementation; it must be set before torch starts its thread pool).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402  (puts the repository root and tests/ on sys.path)
from machine import machine, machine_slug  # noqa: E402

from flux_core.model import FluxParams  # noqa: E402
from flux_core.speed.runtime import RuntimeOptions, accelerate  # noqa: E402

ROOT = peers.ROOT
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FLOOR = "floor: matmuls + attention only"


def mid_params(args) -> FluxParams:
    return FluxParams(hidden_size=args.hidden, num_heads=args.hidden // 128, depth=args.double,
                      depth_single_blocks=args.single, context_in_dim=4096, vec_in_dim=768)


def variants(sd, p, dtype, include_compile: bool, x):
    """name -> (callable(inputs) -> output, note)."""
    out = {}
    dif = peers.diffusers_model(sd, p)
    out["diffusers"] = (lambda x: peers.run_diffusers(dif, x), "FluxTransformer2DModel, default attention processor")
    for attention, label in (("default", "ComfyUI (CPU default attention)"), ("pytorch", "ComfyUI (pytorch attention)")):
        handle = peers.comfy_model(sd, p, attention)
        out[label] = ((lambda h: lambda x: peers.run_comfy(h, x))(handle), f"attention: {handle[2].__name__}")
    eager = peers.ours(sd, p)
    out["flux_core (eager)"] = (lambda x: peers.run_ours(eager, x), "the model as loaded, no runtime")
    fast = peers.ours(sd, p)
    report = accelerate(fast, RuntimeOptions(compile="auto"))
    unchanged = report.precision.name == "native" and not report.compile.enabled and report.attention.name == "sdpa"
    out["flux_core (runtime)"] = (lambda x: peers.run_ours(fast, x), _short(report) + (
        "; the same code as eager here, so the two rows show the timing noise" if unchanged else ""))
    if include_compile and not report.compile.enabled:
        compiled = peers.ours(sd, p)
        c_report = accelerate(compiled, RuntimeOptions(compile="on"))
        if c_report.compile.enabled:
            out["flux_core (runtime + compile)"] = (lambda x: peers.run_ours(compiled, x), _short(c_report))
    out[FLOOR] = (matmul_floor(sd, p, x),
                                               "not a FLUX implementation: the products any implementation computes")
    return out


def matmul_floor(sd, p, x):
    """A callable replaying just the Linear products and attention of one evaluation of the model."""
    model = peers.ours(sd, p)
    calls = []
    hooks = [m.register_forward_hook(lambda mod, args, out: calls.append((mod, args[0].shape)))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.inference_mode():
        peers.run_ours(model, x)
    for hook in hooks:
        hook.remove()
    dtype = x["img"].dtype
    gen = torch.Generator().manual_seed(0)
    linears = [(torch.randn(shape, generator=gen).to(dtype), mod.weight, mod.bias) for mod, shape in calls]
    tokens = x["img"].shape[1] + x["txt"].shape[1]
    qkv = torch.randn(3, x["img"].shape[0], p.num_heads, tokens, p.hidden_size // p.num_heads, generator=gen).to(dtype)
    blocks = p.depth + p.depth_single_blocks

    def run(_):
        for inp, weight, bias in linears:
            out = torch.nn.functional.linear(inp, weight, bias)
        for _ in range(blocks):
            torch.nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return out
    return run


def _short(report) -> str:
    return (f"attention {report.attention.name}, precision {report.precision.name}, "
            f"compile {'on' if report.compile.enabled else 'off'}")


def measure(dtype_name, args):
    dtype = DTYPES[dtype_name]
    p = mid_params(args)
    sd = peers.random_bfl_state_dict(p, seed=0, dtype=dtype)
    x = peers.make_inputs(p, args.image_size, args.txt_len, "cpu", dtype)
    runs = variants(sd, p, dtype, include_compile=not args.no_compile, x=x)
    times = {name: [] for name in runs}
    cpu_times = {name: [] for name in runs}
    with torch.inference_mode():
        outputs, warmup = {}, {}
        for name, (fn, _) in runs.items():  # warm-up (and compilation), untimed in the rounds
            start = time.perf_counter()
            outputs[name] = fn(x).float()
            warmup[name] = time.perf_counter() - start
            print(f"[{dtype_name}] warm-up {name}: {warmup[name]:.1f} s", flush=True)
        for round_ in range(args.repeat):
            for name, (fn, _) in runs.items():
                start, cpu_start = time.perf_counter(), time.process_time()
                fn(x)
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
            print(f"[{dtype_name}] round {round_ + 1}: " + ", ".join(
                f"{n} {t[-1]:.2f} s ({cpu_times[n][-1]:.2f} s CPU)" for n, t in times.items()), flush=True)
    ref = outputs["diffusers"]
    rows = []
    for name, (_, note) in runs.items():
        rows.append({"name": name, "note": note, "median": statistics.median(times[name]), "all": times[name],
                     "cpu": statistics.median(cpu_times[name]), "warmup": warmup[name],
                     "diff": ((outputs[name] - ref).abs().max() / ref.abs().max()).item()
                     if name != FLOOR else float("nan")})
    peers_only = [r for r in rows if not r["name"].startswith(("flux_core", FLOOR))]
    best, best_cpu = min(r["median"] for r in peers_only), min(r["cpu"] for r in peers_only)
    for r in rows:
        r["ratio"], r["cpu_ratio"] = r["median"] / best, r["cpu"] / best_cpu
    n_params = sum(v.numel() for v in sd.values())
    return rows, n_params


def write(args, results, n_params):
    m = machine()
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"transformer_eval-{machine_slug(m)}.md"
    p = mid_params(args)
    lines = [
        "# Time per transformer evaluation on the CPU: flux_core vs diffusers vs ComfyUI",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']:.1f} GiB RAM, {m['os']}; Python {m['python']}, "
        f"torch {m['torch']}, {torch.get_num_threads()} threads for every implementation, CPU only.",
        "",
        f"Model: random FLUX transformer, hidden {p.hidden_size} ({p.num_heads} heads of 128), {p.depth} double + "
        f"{p.depth_single_blocks} single blocks, context 4096, vec 768, {n_params / 1e6:.0f} M parameters, the same "
        f"weight tensors for all. Input: {args.image_size}x{args.image_size} "
        f"({(args.image_size // 16) ** 2} image tokens) + {args.txt_len} text tokens, batch 1.",
        "",
        f"Time: median of {args.repeat} interleaved rounds (every implementation once per round, in turn) after "
        f"one untimed warm-up call each, one process. Two clocks: wall time, and the process's CPU time (both "
        f"threads; idle OpenMP threads sleep, OMP_WAIT_POLICY=PASSIVE, so it counts work). The machine is shared "
        f"with other jobs: wall time then also counts waiting for a core and is noisy (all rounds are listed); "
        f"CPU time is the steadier comparison. Ratio = flux_core / the faster peer on the same clock (goal: <= 0.8).",
        "",
    ]
    for dtype_name, rows in results.items():
        lines += [f"## {dtype_name}", "",
                  "| implementation | CPU s (median) | ratio (CPU) | wall s (median) | ratio (wall) | wall s, each round | "
                  "warm-up s | max rel. diff vs diffusers | notes |",
                  "|---|---:|---:|---:|---:|---|---:|---:|---|"]
        for r in rows:
            lines.append(f"| {r['name']} | {r['cpu']:.2f} | {r['cpu_ratio']:.2f} | {r['median']:.2f} | {r['ratio']:.2f} | "
                         f"{' / '.join(f'{t:.2f}' for t in r['all'])} | {r['warmup']:.1f} | {r['diff']:.1e} | {r['note']} |")
        lines.append("")
    lines += [f"Command: `.venv/bin/python bench/transformer_eval.py {' '.join(sys.argv[1:])}`", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--repeat", type=int, default=3, help="interleaved timed rounds (the median is reported)")
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--double", type=int, default=4)
    parser.add_argument("--single", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--txt-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for all (default: torch's)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled flux_core row")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for dtype_name in args.dtypes:
        results[dtype_name], n_params = measure(dtype_name, args)
        for r in results[dtype_name]:
            print(f"[{dtype_name}] {r['name']:34s} CPU {r['cpu']:7.2f} s (ratio {r['cpu_ratio']:.2f})  wall "
                  f"{r['median']:7.2f} s (ratio {r['ratio']:.2f})  diff {r['diff']:.1e}")
    write(args, results, n_params)


if __name__ == "__main__":
    main()
