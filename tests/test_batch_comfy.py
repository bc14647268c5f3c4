"""The batch over headless ComfyUI: the standard-library websocket client, filling the pack's API
workflows per item, and two real ComfyUI 0.3.75 servers (tiny demo weights, CPU) sharing a batch, then
one of them stopped mid-batch."""
from __future__ import annotations

import json
import socket
import struct
import threading

import pytest

from batch_helpers import files_in, manifest_lines, write_jobs
from flux_core.batch import expand, load_jobs, parse_jobs, run_batch, verify
from flux_core.batch.comfy_client import (FALLBACK_WORKFLOW, SHIPPED_WORKFLOW, ComfyBackend, ComfyError,
                                          check_lora_workflow, check_workflow, fill_workflow, load_workflow,
                                          model_sources)
from flux_core.batch.websocket import BINARY, PING, PONG, TEXT, WebSocket, WebSocketClosed, accept_key

# The smallest image the workflow allows and two steps: the host decodes with the full-size demo autoencoder.
TINY = {"num_inference_steps": 2, "image_size": 64}


# ------------------------------------------------------------------------------------------------
# websocket client


def test_accept_key_matches_the_rfc_example():
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def _server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([n])
    elif n < 65536:
        head += bytes([126]) + struct.pack(">H", n)
    else:
        head += bytes([127]) + struct.pack(">Q", n)
    return head + payload


def _read_client_frame(sock) -> tuple[int, bytes]:
    head = sock.recv(2)
    opcode, masked, n = head[0] & 0x0F, head[1] & 0x80, head[1] & 0x7F
    assert masked, "a client must mask its frames"
    mask = sock.recv(4)
    data = sock.recv(n) if n else b""
    return opcode, bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def test_frames_pings_fragments_and_close():
    ours, theirs = socket.socketpair()
    ws = WebSocket(ours)
    big = bytes(range(256)) * 300  # 76800 bytes: the 64-bit length form
    theirs.sendall(_server_frame(PING, b"hi") + _server_frame(TEXT, b'{"type": '))
    theirs.sendall(_server_frame(TEXT, b'{"a": 1}'))
    theirs.sendall(_server_frame(TEXT, b'{"frag', fin=False) + _server_frame(0x0, b'mented": true}'))
    theirs.sendall(_server_frame(BINARY, big[:300]) + _server_frame(BINARY, big))
    theirs.sendall(_server_frame(0x8, struct.pack(">H", 1000)))
    assert ws.recv(timeout=5) == (TEXT, b'{"type": ')
    assert _read_client_frame(theirs) == (PONG, b"hi")  # the ping was answered with its payload
    assert ws.recv(timeout=5) == (TEXT, b'{"a": 1}')
    assert ws.recv(timeout=5) == (TEXT, b'{"fragmented": true}')
    assert ws.recv(timeout=5) == (BINARY, big[:300])
    assert ws.recv(timeout=5) == (BINARY, big)
    with pytest.raises(WebSocketClosed, match="code 1000"):
        ws.recv(timeout=5)
    assert _read_client_frame(theirs)[0] == 0x8  # the close was echoed
    ws.close()
    theirs.close()


def test_a_frame_split_by_a_timeout_is_not_lost():
    ours, theirs = socket.socketpair()
    ws = WebSocket(ours)
    frame = _server_frame(TEXT, b"x" * 1000)
    theirs.sendall(frame[:10])
    with pytest.raises(socket.timeout):
        ws.recv(timeout=0.2)
    theirs.sendall(frame[10:])
    assert ws.recv(timeout=5) == (TEXT, b"x" * 1000)


# ------------------------------------------------------------------------------------------------
# filling workflows


def _item(**job):
    return expand(parse_jobs([json.dumps({"prompt": "a cat on a roof", **job})]), {})[0]


def test_the_shipped_workflow_gets_every_input_of_an_item():
    assert load_workflow() == json.loads(SHIPPED_WORKFLOW.read_text())
    def graph(workflow):  # what executes, less the prompt text (every item replaces it)
        return {k: {"class_type": v["class_type"], "inputs": {**v["inputs"], "prompt": None}}
                for k, v in workflow.items()}

    assert graph(load_workflow()) == graph(FALLBACK_WORKFLOW)  # the copy for installs without the pack's files
    item = _item(seed=1234, aspect_ratio="16:9", speed_mode="blink", guidance=2.0, image_size=512,
                 output_format="png", output_quality=70, num_inference_steps=9)
    inputs = fill_workflow(load_workflow(), item)["1"]["inputs"]
    assert inputs["prompt"] == "a cat on a roof" and inputs["seed"] == 1234
    assert (inputs["aspect_ratio"], inputs["image_size"], inputs["num_inference_steps"]) == ("16:9", 512, 9)
    assert inputs["speed_mode"] == "Blink of an eye 👁️" and inputs["guidance"] == 2.0
    assert (inputs["output_format"], inputs["output_quality"]) == ("png", 70)
    assert inputs["filename_prefix"] == f"flux_batch/{item.id}"
    assert inputs["transformer_name"] == "flux1-dev.safetensors"  # model files stay the workflow's
    with pytest.raises(ComfyError, match="speed_mode 'off' is not a choice"):
        fill_workflow(load_workflow(), _item(seed=1, speed_mode="off"))


@pytest.mark.parametrize("name", ["flux_modular", "flux_native_ksampler", "flux_variations"])
def test_the_modular_and_native_workflows_are_filled_through_their_nodes(name):
    workflow = load_workflow(SHIPPED_WORKFLOW.parent / f"{name}.json")
    item = _item(seed=77, aspect_ratio="3:2", image_size=512, num_inference_steps=5, guidance=4.5)
    graph = fill_workflow(workflow, item)
    by_type = {node["class_type"]: node["inputs"] for node in graph.values()}
    assert by_type["CLIPTextEncode"]["text"] == "a cat on a roof"
    latent = by_type["EmptySD3LatentImage"]
    assert (latent["width"], latent["height"], latent["batch_size"]) == (512, 336, 1)
    sampler = by_type.get("FluxJuicedSampler") or by_type["KSampler"]
    assert (sampler["seed"], sampler["steps"]) == (77, 5)
    guidance = by_type.get("FluxGuidance", sampler)
    assert guidance["guidance"] == 4.5
    assert graph != workflow and workflow == load_workflow(SHIPPED_WORKFLOW.parent / f"{name}.json")


@pytest.mark.parametrize("name", ["flux_modular", "flux_native_ksampler"])
def test_a_jobs_loras_are_chained_after_the_model_and_clip_loaders(name):
    workflow = load_workflow(SHIPPED_WORKFLOW.parent / f"{name}.json")
    (model,) = model_sources(workflow)
    (clip,) = [[n, 0] for n, node in workflow.items() if node["class_type"] == "FluxJuicedTextEncoderLoader"]
    users = {tuple(link): sorted((n, k) for n, node in workflow.items() for k, v in node["inputs"].items() if v == link)
             for link in (model, clip)}
    item = _item(seed=3, loras=["a.safetensors:0.5", {"name": "b.safetensors"}])
    graph = fill_workflow(workflow, item)
    chain = [(node_id, node["inputs"]) for node_id, node in graph.items() if node["class_type"] == "LoraLoader"]
    assert [(i["lora_name"], i["strength_model"], i["strength_clip"]) for _, i in chain] == [
        ("a.safetensors", 0.5, 0.5), ("b.safetensors", 1.0, 1.0)]
    assert (chain[0][1]["model"], chain[0][1]["clip"]) == (model, clip)
    assert (chain[1][1]["model"], chain[1][1]["clip"]) == ([chain[0][0], 0], [chain[0][0], 1])
    end = {tuple(model): [chain[1][0], 0], tuple(clip): [chain[1][0], 1]}
    for link, used_by in users.items():  # every former user takes the chain's end
        assert used_by and all(graph[n]["inputs"][k] == end[link] for n, k in used_by)
    assert len(graph) == len(workflow) + 2
    assert not any("Lora" in node["class_type"] for node in fill_workflow(workflow, _item(seed=3)).values())

    # without a single CLIP loader to follow: LoRA loaders on the MODEL only
    no_clip = {k: v for k, v in workflow.items()}
    no_clip["99"] = dict(workflow[clip[0]])
    graph = fill_workflow(no_clip, item)
    assert [n["class_type"] for n in graph.values() if "Lora" in n["class_type"]] == ["LoraLoaderModelOnly"] * 2

    # the all-in-one node loads its own model: nothing to put a LoRA after
    with pytest.raises(ValueError, match="need a workflow with a MODEL loader"):
        check_lora_workflow(load_workflow())
    with pytest.raises(ComfyError, match="no MODEL loader"):
        fill_workflow(load_workflow(), item)


def test_unusable_workflows_are_refused_with_the_reason(tmp_path):
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": []}))
    with pytest.raises(ValueError, match="editor \\(UI-format\\) workflow"):
        load_workflow(ui)
    two_prompts = json.loads((SHIPPED_WORKFLOW.parent / "flux_modular.json").read_text())
    two_prompts["99"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "negative", "clip": ["2", 0]}}
    with pytest.raises(ValueError, match="several prompt inputs"):
        check_workflow(two_prompts)
    no_seed = {"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["2", 0]}},
               "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "t", "clip": ["3", 0]}}}
    with pytest.raises(ValueError, match="no literal seed input"):
        check_workflow(no_seed)


# ------------------------------------------------------------------------------------------------
# two real servers


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    import workflow_tools as wt
    from host_server import ComfyServer

    pair = [ComfyServer(tmp_path_factory.mktemp(f"comfy_batch_{i}")) for i in range(2)]
    errors = []

    def start(server):
        try:
            server.start()
            wt.place_demo_models(server, [load_workflow()])
        except Exception as exc:  # noqa: BLE001 - reported below, on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in pair]  # both start-ups at once
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield pair
    finally:
        for server in pair:
            server.stop()


def _seed_in_image(path) -> int:
    from PIL import Image

    return json.loads(Image.open(path).getexif()[0x010E])["seed"]


@pytest.mark.host
@pytest.mark.slow
def test_two_servers_share_a_batch_and_a_rerun_submits_nothing(tmp_path, servers):
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [
        {"prompt": "a red apple", "seed": 21, "variations": 2, **TINY},
        {"prompt": "a green pear", "variations": 2, **dict(TINY, num_inference_steps=8)},
    ])
    out = tmp_path / "out"
    steps_seen = []
    backend = ComfyBackend([s.url for s in servers])
    summary = run_batch(load_jobs(jobs_file), out, backend, quiet=True)
    assert (summary.done, summary.failed, summary.requeued) == (4, 0, 0), summary.failures

    records = manifest_lines(out)
    assert len(records) == 4 and len({r["id"] for r in records}) == 4
    assert {r["server"] for r in records} == {s.url for s in servers}  # both servers did work
    assert verify(out) == [] and files_in(out) == {r["file"] for r in records}
    for r in records:
        steps_seen.append(r["steps_reported"])
        assert r["backend"] == "comfyui" and r["prompt_id"] and r["server_file"].startswith("flux_batch/")
        assert _seed_in_image(out / r["file"]) == r["seed"]  # the host made it from the item's own seed
    assert sorted(steps_seen) == [2, 2, 8, 8]  # progress followed over the websocket
    # full evaluations, read back from the saved images: the workflow's Extra Juiced runs at most 3 of 8 steps in full
    evaluations = {r["prompt"]: set() for r in records}
    for r in records:
        evaluations[r["prompt"]].add(r["evaluations"])
    assert evaluations["a red apple"] == {2} and evaluations["a green pear"] <= {2, 3}
    apples = sorted(r["seed"] for r in records if r["prompt"] == "a red apple")
    pears = sorted(r["seed"] for r in records if r["prompt"] == "a green pear")
    assert apples == [21, 22] and pears[1] == pears[0] + 1

    before = (out / "manifest.jsonl").read_bytes()
    history_before = [len(s.get("/history").json()) for s in servers]
    again = run_batch(load_jobs(jobs_file), out, ComfyBackend([s.url for s in servers]), quiet=True)
    assert (again.skipped, again.done) == (4, 0)
    assert (out / "manifest.jsonl").read_bytes() == before
    assert [len(s.get("/history").json()) for s in servers] == history_before  # nothing was submitted


@pytest.mark.host
@pytest.mark.slow
def test_jobs_with_loras_run_through_the_hosts_lora_loader(tmp_path, servers):
    """The modular workflow on a real server: the job's LoRA (in the server's loras folder) goes through the
    host's LoraLoader; a LoRA the server lacks fails that item alone, with the host's reason."""
    import numpy as np
    from PIL import Image

    import lora_factory as lf

    server = servers[0]
    server.place_model(lf.write_demo_lora(tmp_path / "demo-lora.safetensors"), "loras", "demo-lora.safetensors")
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [
        {"prompt": "a red apple", "seed": 8, **TINY},
        {"prompt": "a red apple", "seed": 8, "loras": ["demo-lora.safetensors:0.9"], **TINY},
        {"prompt": "a red apple", "seed": 8, "loras": ["not-there.safetensors"], **TINY},
    ])
    out = tmp_path / "out"
    workflow = load_workflow(SHIPPED_WORKFLOW.parent / "flux_modular.json")
    summary = run_batch(load_jobs(jobs_file), out, ComfyBackend([server.url], workflow), quiet=True)
    assert (summary.done, summary.failed) == (2, 1), summary.failures
    assert "not-there.safetensors" in summary.failures[0][1]
    plain, styled = (np.asarray(Image.open(out / r["file"]), dtype=np.int16) for r in manifest_lines(out))
    assert np.abs(styled - plain).mean() > 1  # the host applied the LoRA


@pytest.mark.host
@pytest.mark.slow
def test_a_server_lost_mid_batch_gives_its_item_to_the_other(tmp_path, servers):
    """Runs last: it stops the second server."""
    from host_server import free_port

    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [{"prompt": "a blue boat", "seed": 3, "variations": 4, **TINY}])
    out = tmp_path / "out"
    survivor, victim = servers
    stopped = []

    def stop_the_busy_one(backend, result):
        if stopped:
            return
        for thread in backend.threads:
            current = thread.current  # (item, prompt id) while it runs one; read once, it changes under us
            if thread.server.url == victim.url and current and current[1]:
                victim.process.kill()  # lost mid-item: its prompt was submitted and has not finished
                victim.process.wait()
                stopped.append(current[0].id)
                return

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: never takes an item
    backend = ComfyBackend([survivor.url, victim.url, dead], on_commit=stop_the_busy_one)
    summary = run_batch(load_jobs(jobs_file), out, backend, quiet=True)
    assert len(stopped) == 1
    assert (summary.done, summary.failed) == (4, 0), summary.failures
    assert summary.requeued >= 1
    records = manifest_lines(out)
    assert sorted(r["seed"] for r in records) == [3, 4, 5, 6]  # every item exactly once
    assert next(r for r in records if r["id"] == stopped[0])["server"] == survivor.url
    assert verify(out) == []


class _StuckComfyUI:
    """A ComfyUI stand-in on 127.0.0.1 that takes prompts and never finishes them (no websocket: the
    client polls /history), and records what the client asks of it."""

    def __init__(self):
        import http.server

        calls = self.calls = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                calls.append(("GET", self.path, None))
                if self.path == "/system_stats" or self.path.startswith("/history/"):
                    self._reply(200, {})
                else:
                    self._reply(404, {"error": "not here"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                calls.append(("POST", self.path, body))
                self._reply(200, {"prompt_id": body.get("prompt_id")} if self.path == "/prompt" else {})

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_an_item_stuck_on_a_server_times_out_is_taken_off_it_and_fails(tmp_path):
    stuck = _StuckComfyUI()
    try:
        jobs_file = write_jobs(tmp_path / "jobs.jsonl", [{"prompt": "a slow snail", "seed": 5, **TINY}])
        backend = ComfyBackend([stuck.url], item_timeout=1.5)
        summary = run_batch(load_jobs(jobs_file), tmp_path / "out", backend, quiet=True)
    finally:
        stuck.close()
    assert (summary.done, summary.failed) == (0, 1)
    message = summary.failures[0][1]
    assert "did not finish within 1.5 s" in message and "rerun" in message
    prompt_id = next(body["prompt_id"] for method, path, body in stuck.calls if path == "/prompt")
    assert ("POST", "/queue", {"delete": [prompt_id]}) in stuck.calls  # taken off the server's queue
    assert ("POST", "/interrupt", {"prompt_id": prompt_id}) in stuck.calls
    assert manifest_lines(tmp_path / "out") == []
    with pytest.raises(ValueError, match="positive"):
        ComfyBackend([stuck.url], item_timeout=0)


def test_the_comfyui_client_runs_without_torch(tmp_path):
    """`batch --comfyui` on a machine without the engine's torch: the whole command, torch unimportable."""
    import subprocess
    import sys
    from pathlib import Path

    stuck = _StuckComfyUI()
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [{"prompt": "a pear", "seed": 1, "speed_mode": "juiced", **TINY}])
    script = (
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is not installed here')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "from flux_core.cli import main\n"
        f"sys.exit(main(['batch', {str(jobs_file)!r}, '--out', {str(tmp_path / 'out')!r}, '--comfyui', "
        f"{stuck.url!r}, '--item-timeout', '1', '--quiet']))\n")
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                              cwd=Path(__file__).resolve().parent.parent)
    finally:
        stuck.close()
    assert "torch is not installed" not in done.stderr, done.stderr
    assert done.returncode == 1 and "1 failed" in done.stdout, done.stdout + done.stderr  # ran, then timed out
    failure = json.loads((tmp_path / "out" / "failures.jsonl").read_text().splitlines()[0])
    assert "did not finish within 1 s" in failure["error"]
    graph = next(body["prompt"] for method, path, body in stuck.calls if path == "/prompt")
    assert next(n for n in graph.values() if n["class_type"] == "FluxJuicedTextToImage")["inputs"]["speed_mode"] \
        == "Juiced 🔥 (default)"
