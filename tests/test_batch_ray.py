"""The batch on Ray in local mode (a private Ray instance on this machine, no cluster): two CPU workers,
one of them killed mid-batch; its work goes to the queue again and every image lands in the manifest
exactly once."""
from __future__ import annotations

import sys

import pytest

from batch_helpers import files_in, manifest_lines, write_jobs
from flux_core.batch import expand, load_jobs, run_batch, verify
from flux_core.batch.manifest import SeedBook
from flux_core.batch.runner import ModelSpec

TINY = {"num_inference_steps": 2, "image_size": 64}


def test_missing_ray_says_how_to_install_it(monkeypatch):
    from flux_core.batch import ray_runner

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'comfyui-flux-juiced\[ray\]'"):
        ray_runner.RayBackend(ModelSpec(demo=True))


@pytest.mark.slow
def test_two_ray_workers_one_killed_mid_batch_every_item_once(tmp_path):
    import ray

    from flux_core.batch.ray_runner import RayBackend

    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [
        {"prompt": "fixed", "seed": 40, "variations": 5, **TINY},
        {"prompt": "random", "variations": 5, "output_format": "png", **TINY},
    ])
    out = tmp_path / "out"
    killed = []

    def kill_a_busy_worker(backend, result):
        """After a result, kill an actor whose chunk is still running (not one that just finished)."""
        if killed:
            return
        for ref, (actor, _) in backend.inflight.items():
            done, _ = ray.wait([ref], timeout=0)
            if not done:
                ray.kill(actor)
                killed.append(actor)
                return

    backend = RayBackend(ModelSpec(demo=True), workers=2, on_commit=kill_a_busy_worker)
    summary = run_batch(load_jobs(jobs_file), out, backend, quiet=True)

    assert len(killed) == 1
    assert (summary.done, summary.failed) == (10, 0)
    assert summary.requeued == backend.requeued == 1  # the killed actor's one-item chunk
    assert backend.replaced == 1
    records = manifest_lines(out)
    jobs = load_jobs(jobs_file)
    expected = {item.id for item in expand(jobs, {job.id: 0 for job in jobs})}
    assert len(records) == 10 and {r["id"] for r in records} == expected  # each exactly once
    assert verify(out) == [] and files_in(out) == {r["file"] for r in records}
    drawn = next(iter(SeedBook(out).seeds().values()))["seed"]
    seeds = {}
    for r in sorted(records, key=lambda r: r["id"]):
        seeds.setdefault(r["prompt"], []).append(r["seed"])
    assert seeds == {"fixed": [40, 41, 42, 43, 44], "random": [drawn + i for i in range(5)]}
    workers = {r["worker"] for r in records}
    assert {"ray-0", "ray-1"} & workers and len(workers) >= 2  # both first workers, or one and the replacement
    assert all(r["backend"] == "ray" and r["device"] == "cpu" for r in records)
    assert not ray.is_initialized()  # the private instance is shut down afterwards
