"""A real ComfyUI 0.3.75 server, headless on the CPU, with this pack installed, for HTTP tests.

It is scripts/comfyui.py's HeadlessComfy in an isolated base directory (its own models/, custom_nodes/,
output/; an in-memory database; no API nodes), plus request helpers that keep status codes for
assertions. The log is kept for assertions too.
"""
from __future__ import annotations

import json
import shutil
import sys
import uuid
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from comfyui import PACK_NAME, HeadlessComfy, free_port  # noqa: E402,F401

TEST_ARGS = ["--database-url", "sqlite:///:memory:", "--disable-api-nodes"]


class ComfyServer(HeadlessComfy):
    def __init__(self, base_dir: Path, port: int | None = None, env: dict | None = None):
        super().__init__(Path(base_dir), port=port, extra_args=TEST_ARGS, env=env)
        self.base_dir = self.home
        self.client_id = uuid.uuid4().hex

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        return super().start(timeout)

    def models_dir(self, folder: str) -> Path:
        return self.base_dir / "models" / folder

    def place_model(self, source: Path, folder: str, name: str) -> Path:
        target = self.models_dir(folder) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            shutil.copyfile(source, target)
        return target

    # --- HTTP with status codes ----------------------------------------------------------------------
    def get(self, path: str, **kw):
        return requests.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def post(self, path: str, payload: dict, **kw):
        return requests.post(self.url + path, json=payload, timeout=kw.pop("timeout", 30), **kw)

    def object_info(self) -> dict:
        return self.get("/object_info").json()

    def queue(self, prompt: dict, extra_data: dict | None = None) -> requests.Response:
        payload = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            payload["extra_data"] = extra_data
        return self.post("/prompt", payload)

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        return self.wait_prompt(prompt_id, timeout)

    def run(self, prompt: dict, timeout: float = 300.0, extra_data: dict | None = None) -> dict:
        response = self.queue(prompt, extra_data)
        if response.status_code != 200:
            raise AssertionError(f"/prompt refused: {response.status_code} {json.dumps(response.json())[:2000]}")
        return self.wait(response.json()["prompt_id"], timeout)


def messages(entry: dict) -> dict:
    """The status messages of a history entry, by type."""
    return {kind: data for kind, data in entry.get("status", {}).get("messages", [])}
