"""The batch over headless ComfyUI servers: each item becomes the pack's API-format workflow with the
item's inputs filled in, submitted to one of the servers (one submitter thread per server, each taking
the next item when its server is free), followed over the server's websocket, and its image fetched
with /view. The driver writes files and the manifest exactly as for the local engine.

A server that stops answering gives its item back to the queue for the others; the same item can then
finish twice, but only the first result reaches the manifest. Standard library only (urllib and
websocket.py). Without a websocket (a proxy that strips it) the client polls /history instead.
"""
from __future__ import annotations

import copy
import http.client
import json
import queue
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from ..image_files import read_settings
from .driver import ItemResult
from .jobs import WorkItem
from .websocket import BINARY, WebSocket, WebSocketError

SHIPPED_WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "api" / "flux_text_to_image.json"
# The shipped graph above, for installs of flux_core without the pack's files: its one all-in-one node.
FALLBACK_WORKFLOW = {"1": {"class_type": "FluxJuicedTextToImage", "inputs": {
    "prompt": "", "aspect_ratio": "1:1", "speed_mode": "Extra Juiced 🔥 (more speed)", "num_inference_steps": 28,
    "guidance": 3.5, "seed": -1, "image_size": 1024, "output_format": "jpg", "output_quality": 80,
    "transformer_name": "flux1-dev.safetensors", "t5_name": "t5xxl_fp16.safetensors",
    "clip_name": "clip_l.safetensors", "vae_name": "ae.safetensors", "filename_prefix": "flux_juiced/FLUX"}}}
# Item inputs under the names the host's own nodes use for them.
INPUT_ALIASES = {"steps": "num_inference_steps", "noise_seed": "seed"}
PROMPT_NODES = {"CLIPTextEncode": "text"}
LATENT_NODES = ("EmptySD3LatentImage", "EmptyLatentImage")
# node classes whose output (at this index) is a MODEL: a job's LoRAs are chained after them
MODEL_SOURCES = {"FluxJuicedTransformerLoader": 0, "UNETLoader": 0, "UnetLoaderGGUF": 0, "CheckpointLoaderSimple": 0}
CLIP_SOURCES = {"FluxJuicedTextEncoderLoader": 0, "DualCLIPLoader": 0, "CLIPLoader": 0, "CheckpointLoaderSimple": 1}
RETRIES = 3           # connection attempts before a server is given up
MAX_ATTEMPTS = 3      # servers an item may lose before it counts as failed
POLL_S = 5.0          # without websocket news for this long, ask /history directly
DEFAULT_ITEM_TIMEOUT_S = 1800.0  # one image, queue wait included; 12B at 1024 px takes well under a minute on a GPU


class ComfyError(RuntimeError):
    pass


class ItemTimeout(ComfyError):
    pass


class ServerLost(ConnectionError):
    pass


def load_workflow(path=None) -> dict:
    if path is None:
        if SHIPPED_WORKFLOW.is_file():
            path = SHIPPED_WORKFLOW
        else:
            return copy.deepcopy(FALLBACK_WORKFLOW)
    try:
        workflow = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the workflow {path}: {exc}") from None
    if "nodes" in workflow and "links" in workflow:
        raise ValueError(f"{path} is an editor (UI-format) workflow; --workflow needs the API format "
                         "(the editor's Export (API), or a file from workflows/api/)")
    check_workflow(workflow)
    return workflow


def _targets(workflow: dict):
    """(node id, input name, item field) of every literal input an item fills in."""
    fields = {"prompt", "aspect_ratio", "speed_mode", "num_inference_steps", "guidance", "seed", "image_size",
              "output_format", "output_quality"}
    for node_id, node in workflow.items():
        kind = node.get("class_type", "")
        for name, value in node.get("inputs", {}).items():
            if isinstance(value, list):  # a link, not a value
                continue
            field = INPUT_ALIASES.get(name, name)
            if field in fields:
                yield node_id, name, field
            elif PROMPT_NODES.get(kind) == name:
                yield node_id, name, "prompt"
            elif kind in LATENT_NODES and name in ("width", "height", "batch_size"):
                yield node_id, name, name
            elif name == "filename_prefix":
                yield node_id, name, "filename_prefix"


def check_workflow(workflow: dict) -> None:
    """The workflow must take a prompt and a seed from us, each in one place, and save an image."""
    if not isinstance(workflow, dict) or not all(isinstance(n, dict) and "class_type" in n for n in workflow.values()):
        raise ValueError("not an API-format workflow ({node id: {class_type, inputs}})")
    found: dict[str, list] = {}
    for node_id, name, field in _targets(workflow):
        found.setdefault(field, []).append(f"{node_id}.{name}")
    for field in ("prompt", "seed"):
        if not found.get(field):
            raise ValueError(f"the workflow has no literal {field} input to fill in for each job")
    if len(found["prompt"]) > 1:
        raise ValueError(f"the workflow has several prompt inputs ({', '.join(found['prompt'])}): cannot tell "
                         "which one a job's prompt goes to")
    if "filename_prefix" not in found:
        raise ValueError("the workflow has no save node (no filename_prefix input)")


def model_sources(workflow: dict) -> list[list]:
    """[node id, output index] of every MODEL loader in the workflow: where LoRA loaders go."""
    return _sources(workflow, MODEL_SOURCES)


def check_lora_workflow(workflow: dict) -> None:
    if not model_sources(workflow):
        raise ValueError("jobs with loras need a workflow with a MODEL loader for the LoRA loaders to follow; "
                         "the all-in-one node loads its own model. Use --workflow workflows/api/flux_modular.json "
                         "or another API workflow with a transformer loader")


def _sources(workflow: dict, table: dict) -> list[list]:
    return [[node_id, table[node["class_type"]]] for node_id, node in workflow.items()
            if node.get("class_type") in table]


def _users(graph: dict, link: list) -> list[tuple[str, str]]:
    return [(user, name) for user, node in graph.items() for name, value in node.get("inputs", {}).items()
            if value == link]


def _add_loras(graph: dict, loras: list[dict]) -> None:
    """The job's LoRAs chained after each MODEL loader, the loader's users taking the chain's end. With one
    MODEL and one CLIP loader the chain is the host's LoraLoader, which takes the CLIP along, so a LoRA's
    CLIP-L layers apply too, as on the engine; otherwise it is LoraLoaderModelOnly."""
    models, clips = _sources(graph, MODEL_SOURCES), _sources(graph, CLIP_SOURCES)
    clip = clips[0] if len(models) == 1 and len(clips) == 1 else None
    for model in models:
        _chain(graph, loras, model, clip)


def _chain(graph: dict, loras: list[dict], model: list, clip: list | None) -> None:
    ends = {"model": model, "clip": clip}
    users = {role: _users(graph, link) for role, link in ends.items() if link is not None}
    for number, lora in enumerate(loras, start=1):
        lora_id = f"lora{number}_{model[0]}"
        node_inputs = {"model": ends["model"], "lora_name": lora["name"], "strength_model": lora["strength"]}
        if clip is not None:
            node_inputs.update(clip=ends["clip"], strength_clip=lora["strength"])
        graph[lora_id] = {"class_type": "LoraLoader" if clip is not None else "LoraLoaderModelOnly",
                          "inputs": node_inputs}
        ends = {"model": [lora_id, 0], "clip": [lora_id, 1] if clip is not None else None}
    for role, found in users.items():
        for user, name in found:
            graph[user]["inputs"][name] = ends[role]


def fill_workflow(workflow: dict, item: WorkItem) -> dict:
    """A copy of workflow with the item's inputs, its exact seed, one image per run, and a file prefix
    that names the item on the server."""
    from ..speed import presets as speed_presets

    graph = copy.deepcopy(workflow)
    values = dict(item.inputs, seed=item.seed, width=item.width, height=item.height, batch_size=1,
                  filename_prefix=f"flux_batch/{item.id}")
    for node_id, name, field in _targets(graph):
        value = values[field]
        if field == "speed_mode" and value not in speed_presets.SPEED_MODES:
            raise ComfyError(f"speed_mode {value!r} is not a choice of the pack's ComfyUI node "
                             f"({', '.join(speed_presets.SPEED_MODES)})")
        graph[node_id]["inputs"][name] = value
    if item.inputs.get("loras"):
        if not model_sources(graph):
            raise ComfyError("this workflow has no MODEL loader to put the job's LoRAs after")
        _add_loras(graph, item.inputs["loras"])
    return graph


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


class ComfyServer:
    """HTTP and websocket calls to one ComfyUI server."""

    def __init__(self, url: str, timeout: float = 30.0):
        self.url = normalize_url(url)
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex
        self.ws: WebSocket | None = None

    def _request(self, path: str, payload: dict | None = None) -> bytes:
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(self.url + path, data=data,
                                         headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            if exc.code >= 500 and path != "/prompt":  # a server going down or broken, not our request
                raise ServerLost(f"{self.url}: {exc.code} {exc.reason}") from None
            raise
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise ServerLost(f"{self.url}: {getattr(exc, 'reason', exc)}") from None

    def get_json(self, path: str):
        return json.loads(self._request(path))

    def connect(self):
        """Check the server answers and open its websocket (None when it cannot be opened: polling then)."""
        self.get_json("/system_stats")
        ws_url = "ws" + self.url[len("http"):] + f"/ws?clientId={self.client_id}"
        try:
            self.ws = WebSocket.connect(ws_url, timeout=self.timeout)
        except (WebSocketError, OSError):
            self.ws = None

    def close(self):
        if self.ws:
            self.ws.close()
            self.ws = None

    def submit(self, graph: dict) -> str:
        prompt_id = uuid.uuid4().hex
        try:
            answer = json.loads(self._request("/prompt", {"prompt": graph, "client_id": self.client_id,
                                                          "prompt_id": prompt_id}))
        except urllib.error.HTTPError as exc:
            raise ComfyError(f"{self.url} refused the workflow ({exc.code}): {_refusal(exc)}") from None
        return answer.get("prompt_id", prompt_id)

    def history(self, prompt_id: str) -> dict | None:
        entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
        status = (entry or {}).get("status", {})
        return entry if status.get("completed") or status.get("status_str") == "error" else None

    def follow(self, prompt_id: str, on_progress=None, timeout: float = 24 * 3600.0, stop=None) -> dict:
        """Wait for a prompt to finish, reporting its steps; returns its /history entry."""
        deadline = time.monotonic() + timeout
        last_poll = time.monotonic()
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                raise KeyboardInterrupt
            if self.ws is None:
                time.sleep(0.5)
                entry = self.history(prompt_id)
                if entry is not None:
                    return entry
                continue
            try:
                opcode, payload = self.ws.recv(timeout=1.0)
            except (socket.timeout, TimeoutError):
                opcode = None
            except (WebSocketError, OSError):
                self.ws = None  # poll from here on; a dead server shows up as ServerLost there
                continue
            if opcode is not None and opcode != BINARY:  # binary frames are previews
                message = json.loads(payload)
                data = message.get("data") or {}
                if data.get("prompt_id") == prompt_id:
                    kind = message.get("type")
                    if kind == "progress" and on_progress:
                        on_progress(data.get("value"), data.get("max"))
                    ended = (kind in ("execution_success", "execution_error", "execution_interrupted")
                             or (kind == "executing" and data.get("node") is None))
                    if ended:
                        entry = self._history_when_ready(prompt_id)
                        if entry is not None:
                            return entry
            if time.monotonic() - last_poll > POLL_S:  # a missed message must not hang the batch
                last_poll = time.monotonic()
                entry = self.history(prompt_id)
                if entry is not None:
                    return entry
        raise ItemTimeout(f"{self.url}: prompt {prompt_id} did not finish within {timeout:g} s")

    def _history_when_ready(self, prompt_id: str, wait_s: float = 5.0) -> dict | None:
        deadline = time.monotonic() + wait_s  # the end message can come just before /history has it
        while True:
            entry = self.history(prompt_id)
            if entry is not None or time.monotonic() > deadline:
                return entry
            time.sleep(0.05)

    def view(self, image: dict) -> bytes:
        query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
        return self._request(f"/view?{query}")

    def interrupt(self, prompt_id: str):
        """Best effort: drop the prompt from the queue, or stop it if it is running."""
        for path, payload in (("/queue", {"delete": [prompt_id]}), ("/interrupt", {"prompt_id": prompt_id})):
            try:
                self._request(path, payload)
            except Exception:  # noqa: BLE001 - the server may be gone; nothing to clean then
                pass


def _refusal(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read())
    except Exception:  # noqa: BLE001
        return str(exc)
    parts = [body.get("error", {}).get("message", "")]
    for node_id, errors in (body.get("node_errors") or {}).items():
        for error in errors.get("errors", []):
            parts.append(f"node {node_id}: {error.get('message', '')} {error.get('details', '')}".strip())
    return "; ".join(p for p in parts if p)[:2000]


def _execution_error(entry: dict) -> str:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type', 'a node')} failed: {data.get('exception_message', '').strip()}"
        if kind == "execution_interrupted":
            return "interrupted on the server"
    return f"the server reports {entry.get('status', {}).get('status_str', 'no status')}"


def run_item(server: ComfyServer, workflow: dict, item: WorkItem, on_progress=None, stop=None,
             on_submit=None, timeout: float = DEFAULT_ITEM_TIMEOUT_S) -> ItemResult:
    """Run one item on one server. ServerLost when the server cannot be reached. An item that has not
    finished `timeout` seconds after its submission (a stuck server, or one busy with other work) is taken
    off that server and fails; rerunning the batch makes it."""
    start = time.perf_counter()
    try:
        graph = fill_workflow(workflow, item)
    except ComfyError as exc:
        return ItemResult(item, error=str(exc))
    try:
        prompt_id = server.submit(graph)
    except ComfyError as exc:
        return ItemResult(item, error=str(exc))
    if on_submit:
        on_submit(prompt_id)
    submitted = time.perf_counter()
    steps = {"max": 0}

    def progress(value, maximum):
        steps["max"] = max(steps["max"], maximum or 0)
        if on_progress:
            on_progress(value, maximum)

    try:
        entry = server.follow(prompt_id, on_progress=progress, stop=stop, timeout=timeout)
    except ItemTimeout as exc:
        server.interrupt(prompt_id)
        return ItemResult(item, error=f"{exc}; taken off the server (--item-timeout), rerun the batch to make it")
    finished = time.perf_counter()
    if entry.get("status", {}).get("status_str") != "success":
        return ItemResult(item, error=f"{server.url}: {_execution_error(entry)}")
    outputs = entry.get("outputs", {})
    images = [img for out in outputs.values() for img in out.get("images", []) if img.get("type") == "output"]
    if len(images) != 1:
        return ItemResult(item, error=f"{server.url}: the workflow saved {len(images)} images; one per item "
                                      "is expected (one save node, batch size 1)")
    data = server.view(images[0])
    reported = [int(t.split()[1]) for out in outputs.values() for t in out.get("text", [])
                if isinstance(t, str) and t.startswith("seed ") and t.split()[1].isdigit()]
    info = {"seed": reported[0] if reported else item.seed, "worker": server.url, "server": server.url,
            "prompt_id": prompt_id, "server_file": "/".join(filter(None, (images[0].get("subfolder"),
                                                                            images[0]["filename"]))),
            "timings": {"queue_and_run_s": round(finished - submitted, 4),
                        "fetch_s": round(time.perf_counter() - finished, 4),
                        "total_s": round(time.perf_counter() - start, 4)},
            "steps_reported": steps["max"] or None,
            # full transformer evaluations, as the pack's nodes record them in the image (None from other savers)
            "evaluations": read_settings(data).get("evaluations")}
    return ItemResult(item, data=data, extension=Path(images[0]["filename"]).suffix, info=info)


class _ServerThread(threading.Thread):
    """Takes items from the shared queue while its server answers; reports everything to the driver."""

    def __init__(self, url: str, workflow: dict, work: queue.Queue, events: queue.Queue, stop: threading.Event,
                 attempts: dict, item_timeout: float = DEFAULT_ITEM_TIMEOUT_S):
        super().__init__(daemon=True, name=f"comfyui {url}")
        self.server = ComfyServer(url)
        self.workflow, self.work, self.events, self.stop_event = workflow, work, events, stop
        self.attempts = attempts  # item id -> servers lost while running it (shared by all threads)
        self.current: tuple[WorkItem, str | None] | None = None
        self.item_timeout = item_timeout

    def run(self):
        try:
            self._serve()
        except Exception as exc:  # noqa: BLE001 - an unexpected answer: this server is out, its item is not
            current = self.current
            if current:
                self.work.put(current[0])
                self.events.put(("requeued", current[0]))
            self.events.put(("lost", self.server.url, f"{type(exc).__name__}: {exc}"))
        finally:
            self.server.close()

    def _connect(self) -> bool:
        for attempt in range(RETRIES):
            if self.stop_event.is_set():
                return False
            try:
                self.server.connect()
                return True
            except ServerLost as exc:
                error = exc
                self.stop_event.wait(2 ** attempt)
        self.events.put(("lost", self.server.url, str(error)))
        return False

    def _serve(self):
        if not self._connect():
            return
        while not self.stop_event.is_set():
            try:
                item = self.work.get(timeout=0.2)
            except queue.Empty:
                continue
            if item is None:
                return
            self.current = (item, None)
            try:
                result = run_item(self.server, self.workflow, item, stop=self.stop_event,
                                  on_progress=lambda v, m, i=item: self.events.put(("step", self.server.url, i, v, m)),
                                  on_submit=lambda pid, i=item: setattr(self, "current", (i, pid)),
                                  timeout=self.item_timeout)
            except ServerLost as exc:
                self.current = None
                self.attempts[item.id] = self.attempts.get(item.id, 0) + 1
                if self.attempts[item.id] >= MAX_ATTEMPTS:  # something about this item, not the servers
                    self.events.put(("result", ItemResult(item, error=f"lost {MAX_ATTEMPTS} times: {exc}")))
                else:
                    self.work.put(item)  # another server (or this one, back) makes it
                    self.events.put(("requeued", item))
                self.server.close()
                if not self._connect():
                    return
                continue
            except KeyboardInterrupt:  # the driver is stopping
                return
            except Exception as exc:  # noqa: BLE001 - one bad answer fails one item, not the batch
                result = ItemResult(item, error=f"{self.server.url}: {type(exc).__name__}: {exc}")
            self.current = None
            self.events.put(("result", result))


class ComfyBackend:
    name = "comfyui"

    def __init__(self, urls: list[str], workflow: dict | None = None, on_commit=None,
                 item_timeout: float = DEFAULT_ITEM_TIMEOUT_S):
        if not urls:
            raise ValueError("give at least one ComfyUI server address")
        self.urls = [normalize_url(u) for u in urls]
        self.workflow = workflow if workflow is not None else load_workflow()
        check_workflow(self.workflow)
        if item_timeout <= 0:
            raise ValueError(f"the item timeout must be positive; got {item_timeout}")
        self.item_timeout = item_timeout
        self.on_commit = on_commit  # called with (backend, result) after each result; tests stop servers here
        self.threads: list[_ServerThread] = []

    def run(self, items: list[WorkItem], batch_run) -> None:
        work: queue.Queue = queue.Queue()
        events: queue.Queue = queue.Queue()
        stop = threading.Event()
        for item in items:
            work.put(item)
        attempts: dict[str, int] = {}
        self.threads = [_ServerThread(url, self.workflow, work, events, stop, attempts, self.item_timeout)
                        for url in self.urls]
        for thread in self.threads:
            thread.start()
        outstanding, live = len(items), len(self.threads)
        try:
            while outstanding > 0:
                try:
                    event = events.get(timeout=0.5)
                except queue.Empty:
                    continue
                kind = event[0]
                if kind == "result":
                    batch_run.commit(event[1])
                    outstanding -= 1
                    if self.on_commit:
                        self.on_commit(self, event[1])
                elif kind == "step":
                    _, url, item, value, maximum = event
                    batch_run.progress.step(f"{item.id} on {url}: step {value}/{maximum}")
                elif kind == "requeued":
                    batch_run.requeued()
                elif kind == "lost":
                    live -= 1
                    print(f"ComfyUI server {event[1]} is unreachable, carrying on without it: {event[2]}",
                          file=batch_run.progress.stream)
                    if live == 0:  # nobody left to make the rest
                        while True:
                            try:
                                item = work.get_nowait()
                            except queue.Empty:
                                break
                            batch_run.fail(item, "no ComfyUI server reachable")
                            outstanding -= 1
        except KeyboardInterrupt:
            for thread in self.threads:
                current = thread.current
                if current and current[1]:
                    thread.server.interrupt(current[1])
            raise
        finally:
            stop.set()
            for thread in self.threads:
                thread.join(timeout=5)
