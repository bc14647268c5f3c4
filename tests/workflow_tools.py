"""Helpers for the workflow and real-host tests: where the shipped graphs live, how the editor lays out a
node's widget values, a UI -> API converter driven by /object_info, a websocket client, and readers for
the metadata the save nodes write.

The widget rules follow the ComfyUI frontend (comfyui-frontend-package 1.32.9, as pinned for the host):
every INT/FLOAT/STRING/BOOLEAN/COMBO input that is not `forceInput` is a widget, in the node definition's
order (required, then optional); an INT gets an extra "control after generate" value right after it when
its options say `control_after_generate` (or, lacking that option, when it is called seed or noise_seed),
and a COMBO gets one when its options say so. Links to widget inputs override the widget value.
"""
from __future__ import annotations

import contextlib

import json
import re
import socket
import struct
import time
import uuid
from pathlib import Path

from host_server import ComfyServer  # puts scripts/ on sys.path
from comfyui import MODEL_INPUTS, model_file_inputs  # noqa: E402,F401 (MODEL_INPUTS for the tests)

REPO = Path(__file__).resolve().parent.parent
UI_DIR = REPO / "example_workflows"          # served by ComfyUI as the pack's templates
API_DIR = REPO / "workflows" / "api"         # for POST /prompt
LOCAL_WORKFLOWS = ("flux_text_to_image", "flux_modular", "flux_native_ksampler", "flux_variations",
                   "flux_speed_native", "flux_lora")
# Graphs whose job runs at a hosted provider: run by tests/test_remote_host.py against fake providers.
REMOTE_WORKFLOWS = ("flux_remote_text_to_image",)
WORKFLOWS = LOCAL_WORKFLOWS + REMOTE_WORKFLOWS
# Nodes that exist only in the editor (notes); they have no /object_info entry and are never sent to /prompt.
FRONTEND_ONLY = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def load_ui(name: str) -> dict:
    return json.loads((UI_DIR / f"{name}.json").read_text())


def load_api(name: str) -> dict:
    return json.loads((API_DIR / f"{name}.json").read_text())


# ----------------------------------------------------------------------------------------------------
# node definitions (/object_info entries)


def ordered_inputs(info: dict):
    """(name, spec, section) of every input of a node definition, in the definition's order."""
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            yield name, info["input"][section][name], section


def input_type(spec) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def input_options(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_widget(spec) -> bool:
    return input_type(spec) in WIDGET_TYPES and not input_options(spec).get("forceInput")


def has_control_value(name: str, spec) -> bool:
    """Whether the editor stores a "control after generate" value right after this widget's value."""
    kind, options = input_type(spec), input_options(spec)
    if kind == "INT":
        flag = options.get("control_after_generate")
        return bool(flag) if flag is not None else name in ("seed", "noise_seed")
    return kind == "COMBO" and bool(options.get("control_after_generate"))


def widget_layout(info: dict) -> list[tuple[str | None, dict | None]]:
    """The positional layout of a node's widgets_values: (input name, spec), or (None, None) for the control
    value the editor inserts after a seed."""
    layout = []
    for name, spec, _ in ordered_inputs(info):
        if is_widget(spec):
            layout.append((name, spec))
            if has_control_value(name, spec):
                layout.append((None, None))
    return layout


def socket_inputs(info: dict) -> list[tuple[str, str]]:
    """(name, type) of the inputs drawn as sockets (links only)."""
    return [(name, input_type(spec)) for name, spec, _ in ordered_inputs(info) if not is_widget(spec)]


# ----------------------------------------------------------------------------------------------------
# UI format checks and conversion


def check_ui_workflow(ui: dict, object_info: dict) -> list[str]:
    """Problems with a UI-format workflow against the host's node definitions ([] when it is sound)."""
    problems = []
    for key in ("id", "revision", "last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra",
                "version"):
        if key not in ui:
            problems.append(f"top-level key {key!r} missing")
    if ui.get("version") != 0.4:
        problems.append(f"version is {ui.get('version')!r}, not 0.4")
    nodes = {n["id"]: n for n in ui["nodes"]}
    if len(nodes) != len(ui["nodes"]):
        problems.append("duplicate node ids")
    if max(nodes) > ui["last_node_id"]:
        problems.append("last_node_id is below a node id")
    links = {link[0]: link for link in ui["links"]}
    if links and max(links) > ui["last_link_id"]:
        problems.append("last_link_id is below a link id")
    for node in ui["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                    "widgets_values"):
            if key not in node:
                problems.append(f"{where}: key {key!r} missing")
        if node["type"] in FRONTEND_ONLY:
            if not (len(node["widgets_values"]) == 1 and isinstance(node["widgets_values"][0], str)):
                problems.append(f"{where}: a note holds one text")
            continue
        info = object_info.get(node["type"])
        if info is None:
            problems.append(f"{where}: no such node type on the host")
            continue
        if node["properties"].get("Node name for S&R", node["type"]) != node["type"]:
            problems.append(f"{where}: properties['Node name for S&R'] should be {node['type']!r}")
        layout = widget_layout(info)
        values = node["widgets_values"]
        if len(values) != len(layout):
            problems.append(f"{where}: {len(values)} widget values, the editor lays out {len(layout)} "
                            f"({[n or 'control_after_generate' for n, _ in layout]})")
            continue
        for (name, spec), value in zip(layout, values):
            if name is None:
                if value not in ("fixed", "increment", "decrement", "randomize"):
                    problems.append(f"{where}: control value {value!r} after the seed")
                continue
            problems += [f"{where}: {p}" for p in check_value(name, spec, value)]
        sockets = dict(socket_inputs(info))
        widgets = {name for name, _ in layout if name}
        for slot, entry in enumerate(node["inputs"]):
            if entry["name"] not in sockets and entry["name"] not in widgets:
                problems.append(f"{where}: input {entry['name']!r} is not an input of {node['type']}")
            elif entry["name"] in sockets and entry["type"] != sockets[entry["name"]]:
                problems.append(f"{where}: input {entry['name']!r} has type {entry['type']}, "
                                f"not {sockets[entry['name']]}")
            if entry.get("link") is not None:
                link = links.get(entry["link"])
                if link is None or link[3] != node["id"] or link[4] != slot:
                    problems.append(f"{where}: input {entry['name']!r} names link {entry['link']} that does not "
                                    f"end in this slot")
        required = [n for n, spec, section in ordered_inputs(info) if section == "required" and not is_widget(spec)]
        linked = {e["name"] for e in node["inputs"] if e.get("link") is not None}
        for name in required:
            if name not in linked:
                problems.append(f"{where}: required input {name!r} is not linked")
        for slot, entry in enumerate(node["outputs"]):
            if slot >= len(info["output"]) or entry["type"] != info["output"][slot]:
                problems.append(f"{where}: output {slot} should have type "
                                f"{info['output'][slot] if slot < len(info['output']) else 'none'}")
            for link_id in entry.get("links") or []:
                link = links.get(link_id)
                if link is None or link[1] != node["id"] or link[2] != slot:
                    problems.append(f"{where}: output {slot} lists link {link_id} that does not start here")
    for link_id, (_, src, src_slot, dst, dst_slot, kind) in links.items():
        if src not in nodes or dst not in nodes:
            problems.append(f"link {link_id}: unknown node")
            continue
        src_node, dst_node = nodes[src], nodes[dst]
        src_info = object_info.get(src_node["type"], {})
        out_types = src_info.get("output", [])
        if src_slot >= len(out_types) or out_types[src_slot] != kind:
            problems.append(f"link {link_id}: {src_node['type']} output {src_slot} is not {kind}")
        listed = (src_node["outputs"][src_slot].get("links") or []) if src_slot < len(src_node["outputs"]) else []
        if link_id not in listed:
            problems.append(f"link {link_id}: not listed by its source output")
        if dst_slot >= len(dst_node["inputs"]) or dst_node["inputs"][dst_slot].get("link") != link_id:
            problems.append(f"link {link_id}: not held by input slot {dst_slot} of node {dst}")
            continue
        name = dst_node["inputs"][dst_slot]["name"]
        dst_info = object_info.get(dst_node["type"], {})
        spec = next((s for n, s, _ in ordered_inputs(dst_info) if n == name), None) if dst_info else None
        if spec is None or input_type(spec) != kind:
            problems.append(f"link {link_id}: {dst_node['type']}.{name} does not take {kind}")
    return problems


def check_value(name: str, spec, value) -> list[str]:
    """Problems with one literal widget value against its definition (the server's own checks)."""
    kind, options = input_type(spec), input_options(spec)
    if kind == "COMBO":
        choices = spec[0] if isinstance(spec[0], list) else options.get("options", [])
        return [] if value in choices else [f"{name}={value!r} is not one of its choices"]
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and
                                                                             not isinstance(value, int)):
            return [f"{name}={value!r} is not an {kind}"]
        low, high = options.get("min", float("-inf")), options.get("max", float("inf"))
        return [] if low <= value <= high else [f"{name}={value!r} is outside {low}..{high}"]
    if kind == "STRING":
        return [] if isinstance(value, str) else [f"{name}={value!r} is not text"]
    if kind == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"{name}={value!r} is not a boolean"]
    return []


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """The API-format prompt the editor's "Export (API)" gives for a UI-format workflow (no subgraphs).

    Notes and muted/bypassed nodes are left out; widget values are matched to inputs by the layout rules
    above; linked inputs become [source node id, output slot]; _meta.title is the node's title or the
    definition's display name.
    """
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in sorted(ui["nodes"], key=lambda n: n["id"]):
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) != 0:
            continue
        info = object_info[node["type"]]
        inputs: dict = {}
        for (name, _), value in zip(widget_layout(info), node["widgets_values"]):
            if name is not None:
                inputs[name] = value
        for entry in node["inputs"]:
            if entry.get("link") is not None:
                _, src, src_slot, _, _, _ = links[entry["link"]]
                inputs[entry["name"]] = [str(src), src_slot]
        ordered = {name: inputs[name] for name, _, _ in ordered_inputs(info) if name in inputs}
        title = node.get("title") or info.get("display_name") or node["type"]
        prompt[str(node["id"])] = {"inputs": ordered, "class_type": node["type"], "_meta": {"title": title}}
    return prompt


def as_submitted(prompt: dict) -> dict:
    """A prompt graph as read back from an image, less what the host adds while running it (the
    "is_changed" value of nodes with IS_CHANGED)."""
    return {node_id: {k: v for k, v in node.items() if k != "is_changed"} for node_id, node in prompt.items()}


def api_graph(prompt: dict) -> dict:
    """An API prompt reduced to what executes: class types, literal inputs and links."""
    return {node_id: {"class_type": node["class_type"], "inputs": node["inputs"]} for node_id, node in prompt.items()}


@contextlib.contextmanager
def demo_server(base_dir):
    """A started ComfyServer with the demo weights under every file name the shipped workflows use."""
    server = ComfyServer(base_dir).start()
    try:
        place_demo_models(server, [load_api(name) for name in WORKFLOWS])
        yield server
    finally:
        server.stop()


def place_demo_models(server, prompts) -> None:
    """The tiny demo weights (flux_core.demo) under every model file name the API prompts use (LoRAs too)."""
    from flux_core.demo import demo_model_files

    demo = demo_model_files()
    for prompt in prompts:
        for role, folder, name in model_file_inputs(prompt, user_files=True):
            server.place_model(demo[role], folder, name)


# ----------------------------------------------------------------------------------------------------
# making a shipped workflow cheap to run on tiny random weights on a CPU


def shrink(prompt: dict, steps: int = 2, image_size: int = 128, latent_scale: int = 8) -> dict:
    """A copy with few steps and small images (the full-size autoencoder dominates CPU time)."""
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        inputs = node["inputs"]
        for key in ("steps", "num_inference_steps"):
            if isinstance(inputs.get(key), int):
                inputs[key] = steps
        if isinstance(inputs.get("image_size"), int):
            inputs["image_size"] = image_size
        if node["class_type"] == "EmptySD3LatentImage":
            inputs["width"] = max(16, inputs["width"] // latent_scale // 16 * 16)
            inputs["height"] = max(16, inputs["height"] // latent_scale // 16 * 16)
    return prompt


def nodes_of(prompt: dict, class_type: str) -> list[tuple[str, dict]]:
    return [(node_id, node) for node_id, node in prompt.items() if node["class_type"] == class_type]


# ----------------------------------------------------------------------------------------------------
# reading what the save nodes wrote

MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpg": b"\xff\xd8\xff"}


def image_format(data: bytes) -> str | None:
    """png, jpg or webp from a file's first bytes."""
    if data.startswith(MAGIC["png"]):
        return "png"
    if data.startswith(MAGIC["jpg"]):
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def read_metadata(data: bytes) -> dict:
    """What a saved image carries: {"settings": {...} or None, "prompt": API graph or None,
    "workflow": UI graph or None, "text": PNG text chunks}.

    PNG: text chunks (ComfyUI's "prompt"/"workflow", the pack's settings as further chunks, the prompt text
    as "prompt_text" next to the graphs). jpg/webp: EXIF
    ImageDescription (0x010E) holds the settings as JSON, 0x0110 "prompt:<json>" and 0x010F "workflow:<json>"
    the graphs, as ComfyUI's own WebP saver writes them.
    """
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(data))
    out: dict = {"settings": None, "prompt": None, "workflow": None, "text": {}}
    if image.format == "PNG":
        out["text"] = dict(image.text)
        for key in ("prompt", "workflow"):
            if key in image.text:
                try:
                    out[key] = json.loads(image.text[key])
                except json.JSONDecodeError:
                    pass
        settings = {k: _maybe_json(v) for k, v in image.text.items() if k not in ("prompt", "workflow")}
        out["settings"] = settings or None
        return out
    exif = image.getexif()
    if 0x010E in exif:
        out["settings"] = json.loads(exif[0x010E])
    for tag, key in ((0x0110, "prompt"), (0x010F, "workflow")):
        value = exif.get(tag)
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, str) and value.startswith(key + ":"):
            out[key] = json.loads(value[len(key) + 1:])
    return out


def _maybe_json(value: str):
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        return value


def seed_from_ui(output: dict) -> int | None:
    """The seed a pack node reported in its UI text ("seed N")."""
    for text in output.get("text", []):
        match = re.fullmatch(r"seed (\d+)", text)
        if match:
            return int(match.group(1))
    return None


# ----------------------------------------------------------------------------------------------------
# websocket


class WsClient:
    """A websocket client on /ws?clientId=... that records every message of the prompts it follows."""

    def __init__(self, server, client_id: str | None = None, timeout: float = 120.0):
        import websocket

        self.server = server
        self.client_id = client_id or server.client_id
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={self.client_id}",
                                              timeout=timeout)
        self.timeout = timeout

    def close(self):
        self.ws.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def receive(self, deadline: float):
        """One message: ("json", dict) or ("binary", event type, payload); None past the deadline."""
        import websocket

        self.ws.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            opcode, data = self.ws.recv_data()
        except (websocket.WebSocketTimeoutException, socket.timeout):
            return None
        if opcode == websocket.ABNF.OPCODE_BINARY:
            return ("binary", struct.unpack(">I", data[:4])[0], data[4:])
        return ("json", json.loads(data))

    def follow(self, prompt_id: str, on_message=None, timeout: float | None = None) -> list:
        """Every message of one prompt until the host says it is done (executing with node None)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        seen = []
        while True:
            message = self.receive(deadline)
            if message is None:
                raise TimeoutError(f"prompt {prompt_id} gave no end message; got {summarize(seen)}\n"
                                   f"{self.server.log()[-3000:]}")
            if message[0] == "json":
                data = message[1].get("data", {})
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
            seen.append(message)
            if on_message:
                on_message(message)
            if (message[0] == "json" and message[1]["type"] == "executing"
                    and message[1]["data"].get("node") is None and message[1]["data"].get("prompt_id") == prompt_id):
                return seen

    def run(self, prompt: dict, extra_data: dict | None = None, on_message=None, timeout: float | None = None):
        """Queue a prompt for this client and return (prompt_id, its messages)."""
        payload = {"prompt": prompt, "client_id": self.client_id, "prompt_id": uuid.uuid4().hex}
        if extra_data:
            payload["extra_data"] = extra_data
        response = self.server.post("/prompt", payload)
        if response.status_code != 200:
            raise AssertionError(f"/prompt refused: {response.status_code} {response.text[:2000]}")
        prompt_id = response.json()["prompt_id"]
        return prompt_id, self.follow(prompt_id, on_message, timeout)


def of_type(messages: list, kind: str) -> list[dict]:
    return [m[1]["data"] for m in messages if m[0] == "json" and m[1]["type"] == kind]


def summarize(messages: list) -> list[str]:
    return [m[1]["type"] if m[0] == "json" else f"binary:{m[1]}" for m in messages]
