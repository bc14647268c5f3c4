"""Batch generation with the local engine: the jobs file, the manifest, the end-to-end run with variations,
GPU-style batching that keeps every seed, and a run killed midway (SIGKILL, SIGINT) then resumed."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lora_factory as lf
from batch_helpers import FakeBackend, files_in, image_settings, manifest_lines, write_jobs
from flux_core.batch import BatchError, JobError, expand, load_jobs, parse_jobs, run_batch, verify
from flux_core.batch.driver import BatchRun
from flux_core.batch.files import FolderBusyError, sha256_file
from flux_core.batch.manifest import JsonlLog, Manifest, ManifestError, SeedBook
from flux_core.batch.progress import BatchProgress, Summary
from flux_core.batch.command import found_loras
from flux_core.batch.jobs import fingerprint
from flux_core.batch.runner import EngineWorker, LocalBackend, ModelSpec, group_chunks

REPO = Path(__file__).resolve().parent.parent
TINY = {"num_inference_steps": 2, "image_size": 64}  # a tiny-weight image in well under a second


# One thread: the tiny model gains nothing from more, and on a busy shared CPU two threads are many times slower.
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def worker():
    import torch

    threads = torch.get_num_threads()
    w = EngineWorker(ModelSpec(demo=True), name="local", threads=1)
    yield w
    w.close()
    torch.set_num_threads(threads)  # the setting is process-wide: give other test modules theirs back


# ------------------------------------------------------------------------------------------------
# the jobs file


@pytest.mark.parametrize("line, field", [
    ('{"prompt": "a", "num_inference_steps": 80}', "num_inference_steps"),
    ('{"prompt": "a", "promt": "typo"}', "promt"),
    ('{"prompt": "a", "aspect_ratio": "7:3"}', "aspect_ratio"),
    ('{"prompt": "a", "seed": -5}', "seed"),
    ('{"prompt": "a", "seed": 1.5}', "seed"),
    ('{"prompt": "a", "variations": 0}', "variations"),
    ('{"prompt": "a", "speed_mode": "ludicrous"}', "speed_mode"),
    ('{"prompt": "a", "output_format": "gif"}', "output_format"),
    ('{"prompt": "a", "output_quality": 0}', "output_quality"),
    ('{"prompt": "  "}', "prompt"),
    ('{"prompt": "a", "id": "has space"}', "id"),
    ('{"aspect_ratio": "1:1"}', "prompt"),
    ('{"prompt": "a", "loras": 3}', "loras"),
    ('{"prompt": "a", "loras": [{"file": "x.safetensors"}]}', "loras"),
    ('{"prompt": "a", "loras": [{"name": "x.safetensors", "strength": "high"}]}', "loras"),
])
def test_a_bad_line_names_its_line_and_field(line, field):
    lines = ['{"prompt": "fine"}', "", line]
    with pytest.raises(JobError) as caught:
        parse_jobs(lines, source="jobs.jsonl")
    message = str(caught.value)
    assert message.startswith("jobs.jsonl line 3: "), message
    assert repr(field) in message, message


def test_bad_json_duplicate_ids_and_empty_files_are_refused():
    with pytest.raises(JobError, match=r"jobs line 2: not valid JSON \(.* column \d+\)"):
        parse_jobs(['"ok"', '{"prompt": "a",}'])
    with pytest.raises(JobError, match="jobs line 2: expected a JSON object"):
        parse_jobs(['"ok"', "[1, 2]"])
    with pytest.raises(JobError, match=r"line 3: field 'id': 'x' is already used on line 1"):
        parse_jobs(['{"prompt": "a", "id": "x"}', '"b"', '{"prompt": "c", "id": "x"}'])
    with pytest.raises(JobError, match="no jobs"):
        parse_jobs(["", "# only a comment"])


def test_job_ids_do_not_move_when_lines_are_added_and_variations_grow():
    first = parse_jobs(['{"prompt": "a red fox", "seed": 3, "variations": 2}', '"a blue bird"'])
    later = parse_jobs(['# a new first line', '"something new"', '"a blue bird"',
                        '{"prompt": "a red fox", "seed": 3, "variations": 4}'])
    ids_first = {j.inputs["prompt"]: j.id for j in first}
    ids_later = {j.inputs["prompt"]: j.id for j in later}
    assert ids_later["a red fox"] == ids_first["a red fox"]
    assert ids_later["a blue bird"] == ids_first["a blue bird"]
    assert ids_first["a red fox"].startswith("a-red-fox-")
    items_first = expand(first, {first[1].id: 50})
    items_later = expand(later, {later[0].id: 9, later[1].id: 50})
    fox_first = [(i.id, i.seed) for i in items_first if i.job == ids_first["a red fox"]]
    fox_later = [(i.id, i.seed) for i in items_later if i.job == ids_first["a red fox"]]
    assert fox_first == fox_later[:2] and [s for _, s in fox_later] == [3, 4, 5, 6]
    # identical lines are separate jobs; a different seed is a different job
    twins = parse_jobs(['"same"', '"same"', '{"prompt": "same", "seed": 1}'])
    assert len({j.id for j in twins}) == 3 and twins[1].id == twins[0].id + "-2"
    # defaults are filled in, and the width/height follow the aspect ratio
    item = expand(parse_jobs(['{"prompt": "x", "aspect_ratio": "16:9", "image_size": 512, "seed": 0}']), {})[0]
    assert (item.width, item.height) == (512, 288)
    assert item.inputs["num_inference_steps"] == 28 and item.inputs["speed_mode"] == "Extra Juiced 🔥 (more speed)"


def test_loras_in_a_job_are_normalized_and_part_of_what_makes_the_image():
    plain, short, long_form, other = parse_jobs([
        '{"prompt": "x", "seed": 1}',
        '{"prompt": "x", "seed": 1, "loras": "style.safetensors:0.5"}',
        '{"prompt": "x", "seed": 1, "loras": [{"name": "style.safetensors", "strength": 0.5}]}',
        '{"prompt": "x", "seed": 1, "loras": ["style.safetensors", "C:\\\\l\\\\ink.safetensors:2"]}'])
    assert plain.inputs["loras"] == []
    assert short.inputs["loras"] == long_form.inputs["loras"] == [{"name": "style.safetensors", "strength": 0.5}]
    assert other.inputs["loras"] == [{"name": "style.safetensors", "strength": 1.0},
                                     {"name": "C:\\l\\ink.safetensors", "strength": 2.0}]
    # jobs without LoRAs keep the fingerprint they had before jobs could have them
    assert plain.fingerprint == fingerprint({k: v for k, v in plain.inputs.items() if k != "loras"})
    assert short.fingerprint == long_form.fingerprint != plain.fingerprint
    items = expand([plain, short, other], {})
    assert len({item.group_key for item in items}) == 3  # never batched into one call
    # `batch --lora` gives its LoRAs to the lines that name none
    given, own = parse_jobs(['"x"', '{"prompt": "y", "loras": []}'], defaults={"loras": ["style.safetensors:0.5"]})
    assert given.inputs["loras"] == [{"name": "style.safetensors", "strength": 0.5}] and own.inputs["loras"] == []


def test_cli_batch_looks_for_every_lora_before_loading_anything(tmp_path, capsys):
    from flux_core.cli import main

    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"prompt": "x"}, {"prompt": "y", "loras": ["b.safetensors"]}])
    assert main(["batch", str(jobs), "--out", str(tmp_path / "out"), "--demo", "--lora", "a.safetensors:0.5",
                 "--models-dir", str(tmp_path / "models")]) == 2
    err = capsys.readouterr().err
    assert "LoRA files not found: a.safetensors, b.safetensors" in err and str(tmp_path / "models" / "loras") in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# manifest and seeds files


def test_torn_last_line_is_ignored_then_cut_off_and_damage_elsewhere_is_reported(tmp_path):
    log = JsonlLog(tmp_path / "m.jsonl")
    log.append({"id": "a"})
    log.append({"id": "b"})
    with open(log.path, "ab") as f:
        f.write(b'{"id": "c", "fi')  # killed mid-line
    assert [r["id"] for r in log.read()] == ["a", "b"]
    log.repair()
    log.append({"id": "d"})
    assert [r["id"] for r in log.read()] == ["a", "b", "d"]
    assert log.path.read_bytes().count(b"\n") == 3
    with open(log.path, "ab") as f:
        f.write(b'{"id": "broken\n')  # a whole bad line at the end: also a torn write
    assert [r["id"] for r in log.read()] == ["a", "b", "d"]
    log.repair()
    assert log.path.read_bytes().endswith(b'{"id": "d"}\n')
    log.path.write_bytes(b'{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ManifestError, match="line 2 is not valid JSON"):
        log.read()


def test_manifest_keeps_the_first_line_of_an_id_and_verify_finds_every_problem(tmp_path):
    (tmp_path / "a.png").write_bytes(b"A")
    (tmp_path / "b.png").write_bytes(b"B")
    good_a = {"id": "a", "file": "a.png", "sha256": sha256_file(tmp_path / "a.png")}
    manifest = Manifest(tmp_path)
    manifest.append(good_a)
    manifest.append({"id": "a", "file": "other.png", "sha256": "0"})
    manifest.append({"id": "b", "file": "b.png", "sha256": "0" * 64})
    manifest.append({"id": "c", "file": "c.png", "sha256": "0" * 64})
    assert manifest.entries()["a"] == good_a and len(manifest.entries()) == 3
    assert verify(tmp_path) == ["a: listed more than once", "b: b.png does not match its sha256",
                                "c: c.png is missing"]


def test_driver_publishes_each_item_once_and_refuses_a_changed_job(tmp_path):
    jobs = parse_jobs(['{"prompt": "p", "id": "job", "variations": 2, "seed": 5}'])
    summary = run_batch(jobs, tmp_path, FakeBackend(repeat_first=True), quiet=True)
    assert (summary.done, summary.failed) == (2, 0)
    assert [(r["id"], r["seed"]) for r in manifest_lines(tmp_path)] == [("job_000", 5), ("job_001", 6)]
    assert verify(tmp_path) == [] and files_in(tmp_path) == {"job_000.png", "job_001.png"}
    changed = parse_jobs(['{"prompt": "another prompt", "id": "job", "variations": 2, "seed": 5}'])
    with pytest.raises(BatchError, match=r"job 'job' \(line 1\) is not the job it was"):
        run_batch(changed, tmp_path, FakeBackend(), quiet=True)
    with BatchRun(jobs, tmp_path, "fake", quiet=True):
        with pytest.raises(FolderBusyError, match="another batch is writing"):
            BatchRun(jobs, tmp_path, "fake", quiet=True).__enter__()


def test_leftovers_of_a_killed_run_are_cleaned_or_replaced(tmp_path):
    """A temp file (killed mid-write) is removed; an image with no manifest line (killed between the rename
    and the manifest append) is made again over it; a torn manifest tail is cut off."""
    jobs = parse_jobs(['{"prompt": "p", "id": "j", "variations": 2, "seed": 0}'])
    (tmp_path / ".j_000.png.4242.part").write_bytes(b"half an image")
    (tmp_path / ".j_001.png.77.part").write_bytes(b"")
    (tmp_path / "j_000.png").write_bytes(b"an image whose line never made it")
    (tmp_path / "manifest.jsonl").write_bytes(b'{"id": "j_0')
    summary = run_batch(jobs, tmp_path, FakeBackend(), quiet=True)
    assert (summary.skipped, summary.done) == (0, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "j_000.png", "j_001.png", "manifest.jsonl"]
    assert verify(tmp_path) == [] and len(manifest_lines(tmp_path)) == 2
    assert Image.open(tmp_path / "j_000.png").size == (4, 4)


def test_failures_are_counted_logged_and_retried_on_the_next_run(tmp_path):
    jobs = parse_jobs(['{"prompt": "p", "id": "j", "variations": 3, "seed": 0}'])
    summary = run_batch(jobs, tmp_path, FakeBackend(fail={"j_001"}), quiet=True)
    assert (summary.done, summary.failed) == (2, 1)
    assert [json.loads(line)["id"] for line in (tmp_path / "failures.jsonl").read_text().splitlines()] == ["j_001"]
    again = run_batch(jobs, tmp_path, FakeBackend(), quiet=True)
    assert (again.skipped, again.done, again.failed) == (2, 1, 0)
    assert sorted(r["id"] for r in manifest_lines(tmp_path)) == ["j_000", "j_001", "j_002"]


def test_stop_signals_wait_for_the_file_and_line_in_hand():
    from flux_core.batch.command import _sigterm_stops
    from flux_core.batch.files import sigint_deferred

    reached = []
    with pytest.raises(KeyboardInterrupt):
        with sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            reached.append("ctrl-c held")
    with _sigterm_stops(), pytest.raises(KeyboardInterrupt):
        with sigint_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            reached.append("sigterm held")
    assert reached == ["ctrl-c held", "sigterm held"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_progress_shows_rate_and_time_left_and_the_summary_counts():
    stream = io.StringIO()
    progress = BatchProgress(Summary(total=102, skipped=2), stream=stream)
    for _ in range(99):
        progress.image_done()
    progress.image_failed("x_001", "boom")
    summary = progress.finish()
    lines = stream.getvalue().splitlines()
    bars = [line for line in lines if line.startswith("batch [")]
    assert 10 <= len(bars) <= 12  # off a terminal: a line every 10%, not one per image
    assert all(" img/min, " in line and " left" in line for line in bars)
    assert bars[-1].startswith("batch [########################] 100/100") and bars[-1].endswith("1 failed")
    assert "batch finished: 99 images made, 2 already done, 1 failed, 1 of 102 left" in stream.getvalue()
    assert "failed x_001: boom" in stream.getvalue() and "rerun the same command" in lines[-1]
    assert summary.images_per_minute > 0 and summary.as_dict()["done"] == 99


# ------------------------------------------------------------------------------------------------
# the engine end to end


def test_batch_with_variations_end_to_end_and_rerun_skips_everything(tmp_path, worker):
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [
        {"prompt": "a juicy orange", "seed": 11, "variations": 3, **TINY},
        {"prompt": "a lighthouse", "variations": 2, "output_format": "png", "speed_mode": "off", **TINY},
    ])
    out = tmp_path / "out"
    backend = LocalBackend(ModelSpec(demo=True), worker=worker)
    summary = run_batch(load_jobs(jobs_file), out, backend, quiet=True)
    assert (summary.total, summary.done, summary.failed, summary.skipped) == (5, 5, 0, 0)

    records = manifest_lines(out)
    drawn = SeedBook(out).seeds()
    assert len(drawn) == 1  # only the job that asked for a random seed
    lighthouse_seed = next(iter(drawn.values()))["seed"]
    by_prompt = {}
    for r in records:
        by_prompt.setdefault(r["prompt"], []).append(r["seed"])
    assert by_prompt == {"a juicy orange": [11, 12, 13],
                         "a lighthouse": [lighthouse_seed, lighthouse_seed + 1]}
    assert verify(out) == []
    assert files_in(out) == {r["file"] for r in records}
    for r in records:
        assert r["sha256"] == sha256_file(out / r["file"]) and r["bytes"] == (out / r["file"]).stat().st_size
        settings = image_settings(out / r["file"])
        assert (settings["seed"], settings["prompt"], settings["batch_item"]) == (r["seed"], r["prompt"], r["id"])
        assert Image.open(out / r["file"]).size == (64, 64) and (r["width"], r["height"]) == (64, 64)
        assert set(r["timings"]) >= {"encode_s", "denoise_s", "decode_s", "total_s"}
    # extra-juiced at 2 steps computes both; off is the plain reference
    assert {r["prompt"]: r["evaluations"] for r in records} == {"a juicy orange": 2, "a lighthouse": 2}
    assert {r["file"].rsplit(".", 1)[1] for r in records} == {"jpg", "png"}

    before = (out / "manifest.jsonl").read_bytes()
    again = run_batch(load_jobs(jobs_file), out, backend, quiet=True)
    assert (again.skipped, again.done) == (5, 0)
    assert (out / "manifest.jsonl").read_bytes() == before

    # more variations later: only the new ones are made, the random job keeps its seed
    write_jobs(jobs_file, [
        {"prompt": "a juicy orange", "seed": 11, "variations": 3, **TINY},
        {"prompt": "a lighthouse", "variations": 3, "output_format": "png", "speed_mode": "off", **TINY},
    ])
    grown = run_batch(load_jobs(jobs_file), out, backend, quiet=True)
    assert (grown.skipped, grown.done) == (5, 1)
    assert manifest_lines(out)[-1]["seed"] == lighthouse_seed + 2
    assert (out / "manifest.jsonl").read_bytes().startswith(before)


def test_jobs_with_loras_run_with_them_and_say_so(tmp_path, worker):
    lf.write_demo_lora(tmp_path / "demo-lora.safetensors")
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [
        {"prompt": "an orange", "seed": 5, "output_format": "png", **TINY},
        {"prompt": "an orange", "seed": 5, "output_format": "png", "loras": ["demo-lora.safetensors:0.9"], **TINY},
        {"prompt": "an orange", "seed": 5, "output_format": "png", **TINY, "speed_mode": "off"},
    ])
    jobs = load_jobs(jobs_file)
    spec = ModelSpec(demo=True, lora_paths=found_loras(jobs, [tmp_path]))
    assert spec.lora_paths == {"demo-lora.safetensors": str(tmp_path / "demo-lora.safetensors")}
    out = tmp_path / "out"
    summary = run_batch(jobs, out, LocalBackend(spec, worker=EngineWorker.from_models(worker.models, spec)),
                        quiet=True)
    assert (summary.done, summary.failed) == (3, 0)
    plain, styled, after = (out / r["file"] for r in manifest_lines(out))
    assert image_settings(styled)["loras"] == [{"name": "demo-lora.safetensors", "strength": 0.9, "layers": 2}]
    assert "loras" not in image_settings(plain) and "loras" not in image_settings(after)

    def pixels(path):
        return np.asarray(Image.open(path), dtype=np.int16)

    assert np.abs(pixels(styled) - pixels(plain)).mean() > 1  # the LoRA changed the image
    assert np.array_equal(pixels(after), pixels(plain))  # and came off for the next job

    with pytest.raises(ValueError, match=r"LoRA file not found: gone.safetensors \(looked as given and in "):
        found_loras(parse_jobs(['{"prompt": "x", "loras": "gone.safetensors"}']), [tmp_path])


def test_batched_calls_keep_every_seed(worker):
    items = expand(parse_jobs([json.dumps({"prompt": p, "seed": s, "speed_mode": "off", **TINY})
                               for p, s in (("a cat", 1), ("a dog", 2), ("a cow", 3))]
                              + [json.dumps({"prompt": "big", "seed": 4, **TINY, "image_size": 128})]), {})
    chunks = group_chunks(items, 2)
    assert [[i.seed for i in c] for c in chunks] == [[1, 2], [3], [4]]
    assert [[i.seed for i in c] for c in group_chunks(items[::-1], 1)] == [[4], [3], [2], [1]]  # order kept
    assert [[i.seed for i in c] for c in group_chunks(items[::-1], 4)] == [[4], [3, 2, 1]]
    batched = worker.run(chunks[0])
    alone = [worker.run([item])[0] for item in chunks[0]]
    assert [r.info["seed"] for r in batched] == [1, 2] and [r.info["batch_size"] for r in batched] == [2, 2]

    def pixels(result):
        return np.asarray(Image.open(io.BytesIO(result.data)), dtype=np.int16)

    for b, a in zip(batched, alone):
        assert np.abs(pixels(b) - pixels(a)).max() <= 3  # same noise; only float summation order differs
    assert np.abs(pixels(batched[0]) - pixels(batched[1])).mean() > 10  # and the two seeds differ


def test_cli_batch_rejects_a_bad_line_before_loading_anything(tmp_path, capsys):
    from flux_core.cli import main

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "fine"}\n{"prompt": "x", "guidance": 11}\n')
    assert main(["batch", str(jobs), "--out", str(tmp_path / "out"), "--demo"]) == 2
    err = capsys.readouterr().err
    assert "error: jobs.jsonl line 2: field 'guidance': must be a number from 0.0 to 10.0; got 11" in err
    assert not (tmp_path / "out").exists()
    jobs.write_text('{"prompt": "fine"}\n')
    assert main(["batch", str(jobs), "--out", str(tmp_path / "out"), "--workers", "2", "--demo"]) == 2
    assert "--workers is for --ray" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# killed midway, then resumed

KILL_JOBS = [
    {"prompt": "fixed seed", "seed": 100, "variations": 5, **TINY},
    {"prompt": "random seed", "variations": 4, **TINY},
    {"prompt": "single", "seed": 7, "output_format": "webp", **TINY},
]


def _batch_command(jobs: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "flux_core", "batch", str(jobs), "--out", str(out), "--demo"]


def _stop_midway(jobs: Path, out: Path, sig: int, after: int):
    """Run the CLI in a subprocess and send it sig once the manifest has `after` lines."""
    process = subprocess.Popen(_batch_command(jobs, out), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=ONE_THREAD)
    deadline = time.monotonic() + 120
    manifest = out / "manifest.jsonl"
    while time.monotonic() < deadline and process.poll() is None:
        if manifest.exists() and manifest.read_bytes().count(b"\n") >= after:
            break
        time.sleep(0.02)
    assert process.poll() is None, f"the batch ended before it could be stopped: {process.communicate()}"
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=60)
    return process.returncode, stdout, stderr


def _check_stopped_folder(out: Path) -> int:
    """What a stopped run leaves: a valid manifest whose files all check out, and whole images only."""
    assert verify(out) == []
    for path in out.iterdir():
        if path.suffix in (".jpg", ".png", ".webp") and not path.name.startswith("."):
            Image.open(path).load()  # whatever carries a final name is a whole image
    return len(manifest_lines(out))


@pytest.mark.slow
def test_a_run_killed_then_interrupted_resumes_to_exactly_the_full_set(tmp_path, worker):  # worker: 1 thread
    """SIGKILL midway, rerun and Ctrl-C (SIGINT) midway, rerun to the end: every image exactly once."""
    jobs = write_jobs(tmp_path / "jobs.jsonl", KILL_JOBS)
    out = tmp_path / "out"
    expected_ids = {item.id for item in expand(load_jobs(jobs), {j.id: 0 for j in load_jobs(jobs)})}
    assert len(expected_ids) == 10

    code, _, _ = _stop_midway(jobs, out, signal.SIGKILL, after=2)
    assert code == -signal.SIGKILL
    killed_at = _check_stopped_folder(out)
    assert 2 <= killed_at < 10, f"killed after {killed_at} images"
    after_kill = (out / "manifest.jsonl").read_bytes()

    code, stdout, stderr = _stop_midway(jobs, out, signal.SIGINT, after=killed_at + 2)
    assert code == 130, stderr
    assert "batch interrupted" in stderr and "rerun the same command" in stderr
    assert f"({killed_at} were already there" in stdout
    assert not list(out.glob(".*.part"))  # the kill's leftovers were cleaned, and Ctrl-C left none
    interrupted_at = _check_stopped_folder(out)
    assert killed_at + 2 <= interrupted_at < 10, f"interrupted after {interrupted_at} images"
    after_interrupt = (out / "manifest.jsonl").read_bytes()
    assert after_interrupt.startswith(after_kill)  # nothing done was redone or rewritten

    resumed = subprocess.run(_batch_command(jobs, out) + ["--quiet"], cwd=REPO, capture_output=True, text=True,
                             timeout=300, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{10 - interrupted_at} images written" in resumed.stdout
    assert f"({interrupted_at} were already there" in resumed.stdout

    records = manifest_lines(out)
    assert (out / "manifest.jsonl").read_bytes().startswith(after_interrupt)
    assert len(records) == 10 and {r["id"] for r in records} == expected_ids
    assert verify(out) == []
    assert files_in(out) == {r["file"] for r in records}
    assert not list(out.glob(".*.part"))
    seeds = SeedBook(out).seeds()
    assert len(seeds) == 1 and len(SeedBook(out).read()) == 1  # drawn once, reused by both resumed runs
    drawn = next(iter(seeds.values()))["seed"]
    by_prompt = {}
    for r in sorted(records, key=lambda r: r["id"]):
        by_prompt.setdefault(r["prompt"], []).append(r["seed"])
    assert by_prompt == {"fixed seed": [100, 101, 102, 103, 104], "random seed": [drawn + i for i in range(4)],
                         "single": [7]}

    # the resumed set is the very set an uninterrupted run of the same command makes (in this process)
    from flux_core.batch.command import _backend
    from flux_core.cli import build_parser

    reference = tmp_path / "reference"
    args = build_parser().parse_args(["batch", str(jobs), "--out", str(reference), "--demo"])
    run_batch(load_jobs(jobs), reference, _backend(args, load_jobs(jobs)), quiet=True)
    fixed = {r["id"]: r["sha256"] for r in manifest_lines(reference) if r["prompt"] != "random seed"}
    assert len(fixed) == 6
    assert {r["id"]: r["sha256"] for r in records if r["id"] in fixed} == fixed
