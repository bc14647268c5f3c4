"""A real ComfyUI 0.3.75 server, headless on the CPU, with this pack installed, for HTTP tests.

The server runs in an isolated base directory (its own models/, custom_nodes/, output/), so nothing is
written into the host copy, and it is stopped (with its log kept for assertions) at the end.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from install_comfyui import comfyui_dir, install  # noqa: E402

PACK_NAME = "comfyui-flux-juiced"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base_dir: Path, port: int | None = None, env: dict | None = None):
        self.base_dir = Path(base_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env or {}
        self.process: subprocess.Popen | None = None
        self.log_path = self.base_dir / "server.log"
        self.client_id = uuid.uuid4().hex

    # --- lifecycle -----------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> "ComfyServer":
        host = install(comfyui_dir())
        nodes_dir = self.base_dir / "custom_nodes"
        nodes_dir.mkdir(parents=True, exist_ok=True)
        link = nodes_dir / PACK_NAME
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        for folder in ("diffusion_models", "text_encoders", "vae", "checkpoints"):
            (self.base_dir / "models" / folder).mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(host / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir), "--database-url", "sqlite:///:memory:",
               "--disable-api-nodes", "--preview-method", "latent2rgb"]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(cmd, cwd=host, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                if requests.get(self.url + "/system_stats", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout}s:\n{self.log()[-4000:]}")

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def models_dir(self, folder: str) -> Path:
        return self.base_dir / "models" / folder

    def place_model(self, source: Path, folder: str, name: str) -> Path:
        target = self.models_dir(folder) / name
        if not target.exists():
            shutil.copyfile(source, target)
        return target

    # --- HTTP ----------------------------------------------------------------------------------------
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
        """The history entry of a prompt once it has finished (success, error or interruption)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").json().get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"].get("completed") or entry["status"].get("status_str") == "error"):
                return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s:\n{self.log()[-4000:]}")

    def run(self, prompt: dict, timeout: float = 300.0, extra_data: dict | None = None) -> dict:
        response = self.queue(prompt, extra_data)
        if response.status_code != 200:
            raise AssertionError(f"/prompt refused: {response.status_code} {json.dumps(response.json())[:2000]}")
        return self.wait(response.json()["prompt_id"], timeout)

    def view(self, image: dict) -> bytes:
        response = self.get("/view", params={"filename": image["filename"], "subfolder": image["subfolder"],
                                             "type": image["type"]})
        response.raise_for_status()
        return response.content


def messages(entry: dict) -> dict:
    """The status messages of a history entry, by type."""
    return {kind: data for kind, data in entry.get("status", {}).get("messages", [])}
