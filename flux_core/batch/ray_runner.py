"""The batch on Ray: one engine actor per GPU (or --workers actors on CPUs), each loading the models
once, fed chunks of items by this process, which alone writes the files and the manifest.

Without --ray-address Ray starts a private local instance (no cluster needed); with one it joins an
existing cluster, whose nodes must have flux_core installed and the model files at the same paths
(--demo builds its tiny weights on each node). A lost actor (killed, out of memory, its node gone)
shows up as RayActorError on its chunk: the chunk goes back to the queue and a replacement actor is
started, so no item is lost, and since only this process publishes results, none is listed twice.
"""
from __future__ import annotations

import collections
import os
from pathlib import Path

from .jobs import WorkItem
from .runner import GPU_BATCH_SIZE, EngineWorker, ModelSpec, group_chunks

INSTALL_HINT = "Ray is not installed: pip install 'comfyui-flux-juiced[ray]' (or pip install ray)"


def import_ray():
    try:
        import ray
    except ImportError:
        raise RuntimeError(INSTALL_HINT) from None
    return ray


class RayBackend:
    name = "ray"

    def __init__(self, spec: ModelSpec, workers: int | None = None, address: str | None = None,
                 batch_size: int | None = None, max_replacements: int | None = None, on_commit=None):
        if workers is not None and workers < 1:
            raise ValueError(f"--workers must be at least 1; got {workers}")
        self.spec, self.workers, self.address, self.batch_size = spec, workers, address, batch_size
        self.max_replacements = max_replacements
        self.on_commit = on_commit      # called with (backend, result) after each commit; tests kill actors here
        self.actors: list = []
        self.inflight: dict = {}        # object ref -> (actor, chunk)
        self.requeued = 0
        self.replaced = 0
        import_ray()  # fail early, before any model is loaded

    # --- cluster ---------------------------------------------------------------------------------------
    def _init(self, ray):
        if ray.is_initialized():
            return False
        if self.address:
            ray.init(address=self.address, log_to_driver=False)
            return True
        cpus = os.cpu_count() or 1
        package_root = str(Path(__file__).resolve().parents[2])  # workers import flux_core from here too
        path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        ray.init(num_cpus=max(cpus, self.workers or 1), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
        return True

    def _actor_options(self, ray) -> tuple[int, dict]:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if self.spec.device in (None, "cuda") and gpus:
            return self.workers or gpus, {"num_gpus": 1}
        cpus = int(ray.cluster_resources().get("CPU", 1))
        workers = self.workers or 1
        return workers, {"num_cpus": max(1, cpus // workers)}

    def _start_actor(self, ray, options: dict, index: int):
        threads = options.get("num_cpus") if "num_gpus" not in options else None
        actor_class = ray.remote(max_restarts=0, **options)(EngineWorker)
        return actor_class.remote(self.spec, name=f"ray-{index}", threads=threads)

    # --- the batch ---------------------------------------------------------------------------------------
    def run(self, items: list[WorkItem], batch_run) -> None:
        ray = import_ray()
        started = self._init(ray)
        try:
            self._run(ray, items, batch_run)
        finally:
            for actor in self.actors:
                ray.kill(actor)
            self.actors = []
            if started:
                ray.shutdown()

    def _run(self, ray, items, batch_run):
        from ray.exceptions import RayActorError, RayTaskError

        count, options = self._actor_options(ray)
        size = self.batch_size or (GPU_BATCH_SIZE if "num_gpus" in options else 1)
        replacements_left = count if self.max_replacements is None else self.max_replacements
        queue = collections.deque(group_chunks(items, size))
        self.actors = [self._start_actor(ray, options, i) for i in range(count)]
        idle = list(self.actors)
        next_index = count
        last_loss = ""
        while queue or self.inflight:
            while queue and idle:
                actor, chunk = idle.pop(0), queue.popleft()
                self.inflight[actor.run.remote(chunk)] = (actor, chunk)
            if not self.inflight:  # every actor lost and none may be replaced
                for chunk in queue:
                    for item in chunk:
                        batch_run.fail(item, f"every Ray worker was lost; the last: {last_loss}")
                return
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=1.0)
            for ref in ready:
                actor, chunk = self.inflight.pop(ref)
                try:
                    results = ray.get(ref)
                except RayActorError as exc:
                    last_loss = str(exc).strip().splitlines()[-1][:500] if str(exc).strip() else type(exc).__name__
                    # The actor is gone with its chunk: back to the front of the queue, for another actor.
                    queue.appendleft(chunk)
                    self.requeued += len(chunk)
                    batch_run.requeued(len(chunk))
                    self.actors.remove(actor)
                    if replacements_left > 0:
                        replacements_left -= 1
                        replacement = self._start_actor(ray, options, next_index)
                        next_index += 1
                        self.replaced += 1
                        self.actors.append(replacement)
                        idle.append(replacement)
                    continue
                except RayTaskError as exc:  # an error outside EngineWorker.run's own handling
                    for item in chunk:
                        batch_run.fail(item, str(exc).splitlines()[0])
                    idle.append(actor)
                    continue
                idle.append(actor)
                for result in results:
                    batch_run.commit(result)
                    if self.on_commit:
                        self.on_commit(self, result)

    def busy_actors(self) -> list:
        """Actors with a chunk in flight (for tests and diagnostics)."""
        return [actor for actor, _ in self.inflight.values()]
