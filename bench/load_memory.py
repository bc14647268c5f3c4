"""Peak memory and time of loading a FLUX transformer: flux_core.load_transformer vs ComfyUI's own loader.

    .venv/bin/python bench/load_memory.py                 # writes the checkpoint once, measures, writes results
    .venv/bin/python bench/load_memory.py --double 19 --single 38   # the real 23.8 GB size (needs ~60 GB RAM)

A synthetic BFL-layout bf16 checkpoint at full FLUX.1 width (hidden 3072, 24 heads, context 4096, vec 768)
with fewer blocks is written tensor by tensor (the writer holds one tensor at a time). Each loader then runs
in its own fresh subprocess; peak resident memory is ru_maxrss minus the resident size measured right
before the load (after torch and the loader's modules are imported). See bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from machine import machine, machine_slug  # noqa: E402 (bench/ is the script's folder)

ROOT = Path(__file__).resolve().parent.parent
GOAL = 1.25


# ------------------------------------------------------------------------------------------------
# the synthetic checkpoint


def bfl_tensor_shapes(double: int, single: int) -> dict:
    """Key -> shape of a full-width BFL-layout FLUX.1 dev transformer with fewer blocks: the tests' own
    table (tests/transformer_factory.py, written from formats.md 2(a), not from flux_core)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from transformer_factory import bfl_shapes

    from flux_core.model import FluxParams

    return bfl_shapes(FluxParams(depth=double, depth_single_blocks=single))


def write_checkpoint(path: Path, shapes: dict, seed: int = 0, chunk_elems: int = 1 << 22):
    """A safetensors file of random bf16 tensors, written chunk by chunk (the writer stays a few MB)."""
    import torch

    header, offset = {}, 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt", "note": "synthetic FLUX transformer for bench/load_memory.py"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(seed)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, shape in shapes.items():
            n, std = math.prod(shape), (1 / math.sqrt(shape[1]) if len(shape) == 2 else 0.1)
            for start in range(0, n, chunk_elems):
                part = torch.randn(min(chunk_elems, n - start), generator=gen).mul_(std)
                if key.endswith(".scale"):
                    part.add_(1.0)
                f.write(part.to(torch.bfloat16).view(torch.uint8).numpy().tobytes())
    tmp.rename(path)
    return path


# ------------------------------------------------------------------------------------------------
# measuring, inside a child process


def _rss_parts() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "RssAnon:", "RssFile:")):
                name, value = line.split(":")
                out[name] = int(value.split()[0]) * 1024
    return out


class PeakSampler(threading.Thread):
    """Samples anonymous vs file-backed resident memory every few ms (ru_maxrss has only the total)."""

    def __init__(self, interval=0.002):
        super().__init__(daemon=True)
        self.interval, self.stop_flag = interval, threading.Event()
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}

    def run(self):
        while not self.stop_flag.is_set():
            for k, v in _rss_parts().items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(self.interval)

    def stop(self):
        self.stop_flag.set()
        self.join()
        for k, v in _rss_parts().items():
            self.peak[k] = max(self.peak[k], v)


def _host_dir() -> Path:
    sys.path.insert(0, str(ROOT / "scripts"))
    from install_comfyui import comfyui_dir

    return Path(comfyui_dir())


def child(which: str, path: str):
    import torch

    if which == "ours":
        from flux_core.loaders import load_transformer

        def load():
            return load_transformer(path, device="cpu", dtype=torch.bfloat16)
    else:
        host = _host_dir()
        if not (host / "comfy").is_dir():
            raise SystemExit(f"ComfyUI is not installed at {host}; run .venv/bin/python scripts/install_comfyui.py")
        sys.path.insert(0, str(host))
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        import comfy.sd
        import comfy.utils

        options = {"dtype": torch.bfloat16} if which == "comfy_bf16" else {}

        def load():
            sd, metadata = comfy.utils.load_torch_file(path, return_metadata=True)
            patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options=options, metadata=metadata)
            return patcher.model.diffusion_model

    baseline = _rss_parts()
    sampler = PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - t0
    sampler.stop()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    params = list(model.state_dict().values())
    print(json.dumps({
        "which": which, "seconds": seconds, "baseline": baseline["VmRSS"], "peak": maxrss - baseline["VmRSS"],
        "peak_anon": sampler.peak["RssAnon"] - baseline["RssAnon"], "peak_file": sampler.peak["RssFile"] - baseline["RssFile"],
        "after": _rss_parts()["VmRSS"], "param_bytes": sum(t.numel() * t.element_size() for t in params),
        "dtypes": sorted({str(t.dtype) for t in params}), "tensors": len(params),
    }))


# ------------------------------------------------------------------------------------------------
# the parent: machine description, runs, table, results file


def run_child(which: str, path: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())))
    proc = subprocess.run([sys.executable, __file__, "--child", which, str(path)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{which} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


LABELS = {
    "ours": "flux_core.load_transformer(dtype=bf16)",
    "comfy_bf16": "ComfyUI load_torch_file + load_diffusion_model_state_dict(dtype=bf16)",
    "comfy_default": "ComfyUI, same, dtype left to the host (UNETLoader 'default')",
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--double", type=int, default=2, help="double blocks (real model: 19)")
    ap.add_argument("--single", type=int, default=3, help="single blocks (real model: 38)")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "flux_core_bench",
                    help="where the checkpoint is written and kept for later runs (default: the temp folder)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per loader (peak: max; time: min and median)")
    ap.add_argument("--only", nargs="*", default=list(LABELS), choices=list(LABELS))
    ap.add_argument("--no-results-file", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("WHICH", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)

    shapes = bfl_tensor_shapes(double=args.double, single=args.single)
    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / f"flux-synthetic-h3072-d{args.double}-s{args.single}-bf16.safetensors"
    data_bytes = sum(math.prod(s) * 2 for s in shapes.values())
    if not path.exists():
        print(f"writing {path} ({data_bytes / 1e9:.2f} GB, {len(shapes)} tensors) ...", flush=True)
        t0 = time.perf_counter()
        write_checkpoint(path, shapes)
        print(f"  written in {time.perf_counter() - t0:.1f} s", flush=True)
    size = path.stat().st_size

    runs = {which: [] for which in args.only}
    for _ in range(args.repeat):  # interleaved, so a noisy neighbour slows every loader alike
        for which in args.only:
            runs[which].append(run_child(which, path))
    results = {}
    for which in args.only:
        r = dict(runs[which][0])
        times = sorted(x["seconds"] for x in runs[which])
        r["seconds"], r["median_seconds"] = times[0], times[len(times) // 2]
        for key in ("peak", "peak_anon", "peak_file"):
            r[key] = max(x[key] for x in runs[which])
        r["ratio"] = r["peak"] / size
        results[which] = r
        print(f"{which:14s} peak {r['peak'] / 2**30:6.2f} GiB = {r['ratio']:.3f} x file   "
              f"(anon {r['peak_anon'] / 2**30:.2f}, file-backed {r['peak_file'] / 2**30:.2f} GiB)   "
              f"{r['seconds']:.2f} s (median {r['median_seconds']:.2f})   "
              f"params {r['param_bytes'] / 2**30:.2f} GiB {','.join(r['dtypes'])}", flush=True)

    if "ours" in results:
        ours = results["ours"]
        assert ours["tensors"] == len(shapes) and ours["dtypes"] == ["torch.bfloat16"], ours
    m = machine()
    import torch

    lines = [
        "# Transformer load: peak memory and time",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']:.1f} GiB RAM, {m['os']}; "
        f"Python {m['python']}, torch {torch.__version__}, CPU only.",
        "",
        f"Checkpoint: synthetic BFL-layout FLUX.1 dev transformer, bf16, full width (hidden 3072, 24 heads, "
        f"context 4096, vec 768), {args.double} double + {args.single} single blocks: {len(shapes)} tensors, "
        f"file {size / 2**30:.2f} GiB ({size / 1e9:.2f} GB). The file is in the page cache for every run "
        f"(just written / read before), so times are not disk-bound.",
        "",
        "Peak = ru_maxrss of a fresh subprocess minus its resident size right before the load (torch and the "
        f"loader's modules already imported); max over {args.repeat} interleaved runs per loader. "
        "anon / file-backed = sampled peaks of RssAnon / RssFile above the same baseline (file-backed pages "
        f"are the loader's mmap of the checkpoint). Goal for flux_core: peak <= {GOAL} x file size.",
        "",
        "| loader | peak / file | peak GiB | anon GiB | file-backed GiB | load s (min / median) | resident after GiB "
        "| weights |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for which, r in results.items():
        lines.append(f"| {LABELS[which]} | **{r['ratio']:.3f}** | {r['peak'] / 2**30:.2f} | "
                     f"{r['peak_anon'] / 2**30:.2f} | {r['peak_file'] / 2**30:.2f} | {r['seconds']:.2f} / "
                     f"{r['median_seconds']:.2f} | "
                     f"{(r['after'] - r['baseline']) / 2**30:.2f} | {r['param_bytes'] / 2**30:.2f} GiB "
                     f"{', '.join(d.replace('torch.', '') for d in r['dtypes'])} |")
    lines.append("")
    if "ours" in results:
        verdict = "meets" if results["ours"]["ratio"] <= GOAL else "MISSES"
        lines.append(f"flux_core {verdict} the goal: {results['ours']['ratio']:.3f} x file size (goal <= {GOAL}).")
    lines += [
        "",
        "Where the memory goes:",
        "* flux_core parses the header, checks every shape against a model built on the `meta` device, then reads "
        "each tensor with `readinto` straight into the buffer that becomes the parameter (no mmap, no second "
        "copy, no dtype change for a bf16 file loaded as bf16): peak = the weights.",
        "* ComfyUI's `load_torch_file` memory-maps the file (safetensors `safe_open`) and keeps the mapped state "
        "dict alive while `load_state_dict` copies it into freshly allocated parameters, so the process holds the "
        "mapped file pages (file-backed, reclaimable page cache, but resident and counted) plus the weights: ~2x.",
        "* With the dtype left to the host, ComfyUI on a CPU picks float32 and upcasts: weights 2x plus the mapping.",
        "* Load times are noisy here (a shared 2-core VM with other jobs running); the file is in the page cache.",
        "",
    ]
    lines.append(f"Command: `.venv/bin/python bench/load_memory.py --double {args.double} --single {args.single} "
                 f"--repeat {args.repeat}`")
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if not args.no_results_file:
        out = ROOT / "bench" / "results" / f"load_memory-{machine_slug(m)}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out.relative_to(ROOT)}")
    if "ours" in results and results["ours"]["ratio"] > GOAL:
        sys.exit(1)


if __name__ == "__main__":
    main()
