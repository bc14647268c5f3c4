"""Peak memory and time per evaluation of quantized weight storage: GGUF Q4 files kept quantized, bf16
files stored int8 / fp8 at load time, against the plain bf16 model.

    .venv/bin/python bench/quantized_memory.py                  # CPU: peak RSS; CUDA when present: peak VRAM
    .venv/bin/python bench/quantized_memory.py --double 19 --single 38 --image-size 1024   # the real 12B size

Synthetic FLUX.1 [dev] transformers at full width (hidden 3072, 24 heads, context 4096, vec 768) with
fewer blocks: a bf16 safetensors file (bench/load_memory.py's writer) and GGUF Q4_0 / Q4_K files in
city96's layout (random valid blocks, tests/gguf_factory.py's streaming writer). Each configuration runs
in a fresh subprocess: load, then one warm-up and --evals timed transformer evaluations at one image size.
See bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine, machine_slug  # noqa: E402 (bench/ is the script's folder)

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [  # (label, file kind, weights)
    ("bf16 dense", "bf16", "auto"),
    ("bf16 -> int8", "bf16", "int8"),
    ("bf16 -> fp8", "bf16", "fp8"),
    ("GGUF Q4_0", "Q4_0", "auto"),
    ("GGUF Q4_K", "Q4_K", "auto"),
]


# ------------------------------------------------------------------------------------------------
# memory readings (Linux /proc; the peak is reset with clear_refs so it covers only what follows)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Meter:
    """Peak process memory (CPU: resident set, CUDA: allocated device memory) over a phase, above a baseline."""

    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device.startswith("cuda")

    def start(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.base = self.torch.cuda.memory_allocated()
        else:
            self.base = _status("VmRSS")
            self.reset = _reset_peak()

    def peak(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated() - self.base
        return _status("VmHWM") - self.base

    def now(self) -> int:
        return (self.torch.cuda.memory_allocated() if self.cuda else _status("VmRSS")) - self.base


def child(spec: dict) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    from flux_core.loaders import load_transformer
    from flux_core.quant.loading import storage_report
    from transformer_factory import make_inputs

    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    meter = Meter(device)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    meter.start()
    start = time.perf_counter()
    model = load_transformer(spec["path"], device=device, dtype=dtype, weights=spec["weights"])
    sync()
    out = {"load_s": time.perf_counter() - start, "load_peak": meter.peak(), "resident": meter.now()}
    out.update(storage_report(model))
    if not spec["evals"]:
        return out
    side = spec["image_size"] // 16
    inputs = make_inputs(model.params, batch=1, rows=side, cols=side, txt_len=spec["txt_len"], dtype=dtype)
    inputs = {k: v.to(device) if v is not None else None for k, v in inputs.items()}
    times = []
    meter.start()
    with torch.inference_mode():
        for i in range(spec["evals"] + 1):
            sync()
            start = time.perf_counter()
            model(inputs["img"], inputs["img_ids"], inputs["txt"], inputs["txt_ids"], inputs["timesteps"],
                  inputs["y"], inputs["guidance"])
            sync()
            if i:  # the first call warms up
                times.append(time.perf_counter() - start)
    out.update(eval_peak=meter.peak(), eval_s=statistics.median(times), eval_min_s=min(times),
               peak_reset=getattr(meter, "reset", True))
    return out


def run_child(specs: list[dict], env: dict | None = None) -> list[dict]:
    """Measure each spec in turn in one fresh process (each model is dropped before the next load)."""
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(specs)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})})
    if proc.returncode:
        raise SystemExit(f"child failed for {specs}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# files


def write_files(folder: Path, double: int, single: int) -> dict[str, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from gguf_factory import write_random_flux_gguf
    from load_memory import bfl_tensor_shapes, write_checkpoint

    shapes = bfl_tensor_shapes(double, single)
    files = {"bf16": folder / f"flux-{double}d{single}s-bf16.safetensors"}
    files.update({q: folder / f"flux-{double}d{single}s-{q}.gguf" for q in ("Q4_0", "Q4_K")})
    for kind, path in files.items():
        if not path.exists():
            print(f"writing {path} ...", file=sys.stderr)
            tmp = path.with_name(path.name + ".partial")
            if kind == "bf16":
                write_checkpoint(tmp, shapes)
            else:
                write_random_flux_gguf(shapes, tmp, kind)
            tmp.rename(path)
    return files


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child")
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=2)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--image-size", type=int, default=None, help="default 1024 on CUDA, 256 on the CPU")
    parser.add_argument("--txt-len", type=int, default=None, help="text tokens; default 512 on CUDA, 64 on the CPU")
    parser.add_argument("--evals", type=int, default=None, help="timed evaluations; default 5 on CUDA, 2 on the CPU")
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "flux_quantized_bench"))
    parser.add_argument("--only", nargs="*", help="labels to run (default all)")
    args = parser.parse_args()
    if args.child:
        import gc

        results = []
        for spec in json.loads(args.child):
            results.append(child(spec))
            gc.collect()
        print(json.dumps(results))
        return

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    image_size = args.image_size or (1024 if gpu else 256)
    txt_len = args.txt_len or (512 if gpu else 64)
    evals = args.evals or (5 if gpu else 2)
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    files = write_files(folder, args.double, args.single)
    rows = []
    for label, kind, weights in CONFIGS:
        if args.only and label not in args.only:
            continue
        spec = {"path": str(files[kind]), "weights": weights, "dtype": "bfloat16", "device": device,
                "image_size": image_size, "txt_len": txt_len, "evals": evals}
        result = run_child([spec])[0]  # a fresh process per configuration: no allocator history
        result.update(label=label, file_bytes=files[kind].stat().st_size)
        rows.append(result)
        print(f"{label}: load peak {gib(result['load_peak'])} GiB, eval {result['eval_s']:.2f} s", file=sys.stderr)

    m = machine()
    memory = "VRAM (torch.cuda.max_memory_allocated)" if gpu else "RSS (VmHWM over VmRSS before the phase)"
    lines = [
        f"# quantized weight storage: peak memory and time per evaluation ({m.get('gpu') or m['cpu']})",
        "",
        f"Machine: {json.dumps(m)}",
        "",
        f"Model: synthetic FLUX.1 dev at full width with {args.double} double + {args.single} single blocks; "
        f"compute dtype bf16 on {device}; one evaluation = one transformer forward at {image_size}x{image_size} "
        f"({(image_size // 16) ** 2} image tokens) with {txt_len} text tokens, batch 1; median of {evals} after "
        f"one warm-up. Peak memory is {memory}, above the level right before the phase.",
        "",
        "| storage | file GiB | weights in memory GiB | load peak GiB | load peak / file | load s | "
        "eval peak GiB | s / evaluation |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['label']} | {gib(r['file_bytes'])} | {gib(r['total_bytes'])} | {gib(r['load_peak'])} | "
                     f"{r['load_peak'] / r['file_bytes']:.2f} | {r['load_s']:.2f} | {gib(r['eval_peak'])} | "
                     f"{r['eval_s']:.2f} |")
    lines += ["", "Packed layers per configuration: " + "; ".join(
        f"{r['label']}: {r['packed_layers'] or 'none'}" for r in rows), ""]
    text = "\n".join(lines)
    print(text)
    out = ROOT / "bench" / "results" / f"quantized_memory-{machine_slug(m)}.md"
    out.write_text(text)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
