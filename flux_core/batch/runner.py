"""The local engine as a batch worker: models loaded once, items run in order, on a GPU several prompts
of the same shape and settings per generate() call.

Each image keeps its own seed in a batched call: the noise is drawn per item exactly as generate()
draws it for a single image, and handed over as initial_noise. EngineWorker is also what a Ray actor
runs (ray_runner.py), so it returns encoded bytes rather than writing into the output folder.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .driver import ItemResult
from .jobs import WorkItem

GPU_BATCH_SIZE = 4
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass
class ModelSpec:
    """Where a worker finds its models; plain data, so it travels to Ray actors on other machines."""

    paths: dict = field(default_factory=dict)   # transformer, autoencoder, t5, clip -> path
    demo: bool = False                            # tiny random weights, built where the worker runs
    tokenizer_dir: str | None = None
    device: str | None = None                     # default: cuda when there is one, else cpu
    dtype: str | None = None                      # bf16 / fp16 / fp32; default bf16 on GPUs, fp32 on CPUs
    weights: str = "auto"                         # transformer weight storage (load_models' weights)
    memory: dict = field(default_factory=dict)    # load_models' low-memory options (offload, budget, ...)
    lora_paths: dict = field(default_factory=dict)  # a jobs file's LoRA name -> the file (found_loras)

    def model_name(self) -> str:
        if self.demo:
            return "flux1-dev (demo random weights)"
        return Path(str(self.paths.get("transformer", "unknown"))).name


def group_chunks(items: list[WorkItem], size: int) -> list[list[WorkItem]]:
    """Chunks of at most size items that can share a generate() call (same WorkItem.group_key),
    in the order each group first appears; with size 1, simply the items in order."""
    if size <= 1:
        return [[item] for item in items]
    groups: dict[tuple, list[WorkItem]] = {}
    for item in items:
        groups.setdefault(item.group_key, []).append(item)
    return [group[i:i + size] for group in groups.values() for i in range(0, len(group), size)]


class EngineWorker:
    def __init__(self, spec: ModelSpec, name: str = "engine", threads: int | None = None):
        import torch

        from ..pipeline import load_models

        if threads:
            torch.set_num_threads(threads)
        self.spec, self.name = spec, name
        self.device = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype_name = spec.dtype or ("fp32" if self.device == "cpu" else "bf16")  # CPUs are slow at bf16
        self.dtype = getattr(torch, DTYPES[dtype_name])
        paths = dict(spec.paths)
        if spec.demo:
            from ..demo import demo_model_files

            files = demo_model_files()
            paths = dict(files, autoencoder=files["tiny_autoencoder"])  # as `generate --demo`
        self.models = load_models(paths["transformer"], paths["autoencoder"], paths["t5"], paths["clip"],
                                  tokenizer_dir=spec.tokenizer_dir, device=self.device, dtype=self.dtype,
                                  weights=spec.weights, **spec.memory)
        self.scratch = Path(tempfile.mkdtemp(prefix="flux-batch-"))

    @classmethod
    def from_models(cls, models, spec: ModelSpec, name: str = "engine") -> "EngineWorker":
        """A worker around models already in memory (benchmarks with random full-size weights)."""
        worker = cls.__new__(cls)
        worker.spec, worker.name, worker.models = spec, name, models
        param = next(models.transformer.parameters())
        worker.device, worker.dtype = str(param.device), param.dtype
        worker.scratch = Path(tempfile.mkdtemp(prefix="flux-batch-"))
        return worker

    @property
    def on_gpu(self) -> bool:
        return self.device not in ("cpu", "mps")

    def close(self):
        shutil.rmtree(self.scratch, ignore_errors=True)

    def ping(self) -> str:
        return f"{self.name} pid {os.getpid()} on {self.device}"

    def run(self, items: list[WorkItem], on_step=None) -> list[ItemResult]:
        """Make the images of items (all with the same group_key). Errors come back per item, so one bad
        chunk does not stop the batch; KeyboardInterrupt is let through."""
        import torch

        from ..pipeline import generate
        from ..sampling import get_noise

        first = items[0]
        inputs = first.inputs
        try:
            noise = torch.cat([get_noise(1, first.height, first.width, self.device, self.dtype, item.seed)
                               for item in items])
            callback = (lambda info: on_step(info.step, info.total)) if on_step else None
            result = generate([item.inputs["prompt"] for item in items], self.models,
                              aspect_ratio=inputs["aspect_ratio"], image_size=inputs["image_size"],
                              num_inference_steps=inputs["num_inference_steps"], guidance=inputs["guidance"],
                              seed=first.seed, initial_noise=noise, speed_mode=inputs["speed_mode"],
                              loras=[(self.spec.lora_paths[lora["name"]], lora["strength"])
                                     for lora in inputs["loras"]],
                              callback=callback)
        except Exception as exc:  # noqa: BLE001 - reported per item, the batch goes on
            message = f"{type(exc).__name__}: {exc}"
            return [ItemResult(item, error=message) for item in items]
        per_image = {k: v / len(items) for k, v in result.timings.items()}
        return [self._encode(item, image, result, per_image) for item, image in zip(items, result.images)]

    def _encode(self, item: WorkItem, image, result, timings: dict) -> ItemResult:
        from ..image_files import save_image

        fmt = item.inputs["output_format"]
        metadata = {"prompt": item.inputs["prompt"], **result.settings, "seed": item.seed,
                    "demo": self.spec.demo, "model": self.spec.model_name(), "batch_item": item.id}
        path = save_image(image, self.scratch / f"{item.id}.{fmt}", fmt, item.inputs["output_quality"],
                          metadata=metadata, overwrite=True)
        try:
            data = path.read_bytes()
        finally:
            path.unlink(missing_ok=True)
        info = {"seed": item.seed, "width": result.width, "height": result.height,
                "evaluations": result.evaluations, "timings": {k: round(v, 4) for k, v in timings.items()},
                "worker": self.name, "device": self.device, "batch_size": len(result.images)}
        return ItemResult(item, data=data, extension=path.suffix, info=info)


class LocalBackend:
    """The batch in this process: one EngineWorker, models loaded once, chunks in order."""

    name = "engine"

    def __init__(self, spec: ModelSpec, batch_size: int | None = None, worker: EngineWorker | None = None,
                 on_commit=None):
        self.spec, self.batch_size = spec, batch_size
        self.worker = worker  # an already loaded worker to reuse (kept open); else one per run
        self.on_commit = on_commit  # called with (backend, result) after each result, as the other backends do

    def run(self, items: list[WorkItem], batch_run) -> None:
        worker = self.worker or EngineWorker(self.spec, name="local")
        try:
            size = self.batch_size or (GPU_BATCH_SIZE if worker.on_gpu else 1)
            for chunk in group_chunks(items, size):
                label = chunk[0].id if len(chunk) == 1 else f"{chunk[0].id} +{len(chunk) - 1}"
                on_step = lambda step, total: batch_run.progress.step(f"{label}: step {step}/{total}")  # noqa: E731
                for result in worker.run(chunk, on_step=on_step):
                    batch_run.commit(result)
                    if self.on_commit:
                        self.on_commit(self, result)
        finally:
            if worker is not self.worker:
                worker.close()
