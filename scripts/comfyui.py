"""Run ComfyUI 0.3.75 with this pack: for the graph editor (`serve`), or headless to run one API-format
workflow and write its image (`run-workflow`).

The host copy comes from scripts/install_comfyui.py; ComfyUI's own folders (models, output, user) live in
a home folder (.cache/comfyui-home by default), and --models-dir points the loaders at an existing
ComfyUI-style models folder. Without real weights, `run-workflow` uses tiny demo weights and says so.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))
from install_comfyui import comfyui_dir, install  # noqa: E402

PACK_NAME = "comfyui-flux-juiced"
DEFAULT_HOME = ROOT / ".cache" / "comfyui-home"
DEFAULT_WORKFLOW = ROOT / "workflows" / "api" / "flux_text_to_image.json"
MODEL_FOLDERS = ("diffusion_models", "text_encoders", "vae", "checkpoints")
DEMO_IMAGE_SIZE = 256


def prepare_home(home: Path, models_dir: Path | None) -> list[str]:
    """Create the home folder with the pack linked in; returns extra ComfyUI arguments."""
    (home / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = home / "custom_nodes" / PACK_NAME
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    for folder in MODEL_FOLDERS:
        (home / "models" / folder).mkdir(parents=True, exist_ok=True)
    if not models_dir:
        return []
    config = home / "extra_model_paths.yaml"
    lines = ["flux_juiced_models:", f"    base_path: {Path(models_dir).resolve()}"]
    lines += [f"    {folder}: {folder}" for folder in MODEL_FOLDERS]
    config.write_text("\n".join(lines) + "\n")
    return ["--extra-model-paths-config", str(config)]


def comfy_command(home: Path, port: int, listen: str, extra: list[str]) -> list[str]:
    import torch

    host = install(comfyui_dir())
    cmd = [sys.executable, str(host / "main.py"), "--listen", listen, "--port", str(port), "--base-directory",
           str(home), "--preview-method", "latent2rgb", *extra]
    if not torch.cuda.is_available():
        cmd.append("--cpu")
    return cmd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HeadlessComfy:
    """A ComfyUI server with this pack on 127.0.0.1 for programs: start, queue, wait, stop."""

    def __init__(self, home: Path, models_dir=None, port: int | None = None, extra_args=(), env: dict | None = None,
                 log_name: str = "server.log"):
        self.home = Path(home)
        self.external_models = models_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args)
        self.env = env or {}
        self.log_path = self.home / log_name
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 300.0):
        cmd = comfy_command(self.home, self.port, "127.0.0.1",
                            prepare_home(self.home, self.external_models) + self.extra_args)
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(cmd, cwd=comfyui_dir(), stdout=log, stderr=subprocess.STDOUT,
                                            env=dict(os.environ, PYTHONUNBUFFERED="1", **self.env))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get_json("/system_stats", timeout=2)
                return self
            except OSError:
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

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get_bytes(self, path: str, timeout: float = 30) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return response.read()

    def get_json(self, path: str, timeout: float = 30):
        return json.loads(self.get_bytes(path, timeout))

    def queue_prompt(self, prompt: dict, **payload) -> str:
        request = urllib.request.Request(self.url + "/prompt", data=json.dumps({"prompt": prompt, **payload}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())["prompt_id"]
        except urllib.error.HTTPError as exc:
            raise SystemExit(f"ComfyUI refused the workflow ({exc.code}): {exc.read().decode()[:2000]}") from None

    def wait_prompt(self, prompt_id: str, timeout: float = 3600.0) -> dict:
        """The history entry of a prompt once it has finished (success, error or interruption)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            status = (entry or {}).get("status", {})
            if status.get("completed") or status.get("status_str") == "error":
                return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s:\n{self.log()[-4000:]}")

    def view(self, image: dict) -> bytes:
        query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
        return self.get_bytes(f"/view?{query}")


def _is_demo_file(path: Path) -> bool:
    from flux_core.checkpoints.reader import open_checkpoint
    from flux_core.demo import DEMO_MARKER

    with open_checkpoint(path) as tf:
        return tf.metadata.get("flux_core") == DEMO_MARKER


# The pack's model-file inputs: input name -> (flux_core role, ComfyUI models folder).
MODEL_INPUTS = {"transformer_name": ("transformer", "diffusion_models"), "t5_name": ("t5", "text_encoders"),
                "clip_name": ("clip", "text_encoders"), "vae_name": ("autoencoder", "vae")}


# Files a workflow may name that users bring themselves (no official download): demo runs place a demo file.
USER_FILE_INPUTS = {"lora_name": ("lora", "loras")}


def model_file_inputs(prompt: dict, user_files: bool = False):
    """(role, folder, file name) of every model file an API-format prompt names (and, with user_files, of the
    files like LoRAs that users bring)."""
    known = {**MODEL_INPUTS, **USER_FILE_INPUTS} if user_files else MODEL_INPUTS
    for node in prompt.values():
        for key, value in node.get("inputs", {}).items():
            if key in known and isinstance(value, str):
                yield (*known[key], value)


def _demo_weights(home: Path, workflow: dict) -> bool:
    """Put tiny demo weights under the file names the workflow asks for where no file is present; True when
    the workflow runs on demo weights (placed now or by an earlier run)."""
    from flux_core.demo import demo_model_files

    demo_files, used = None, False
    for role, folder, name in model_file_inputs(workflow, user_files=True):
        target = home / "models" / folder / name
        if not target.exists():
            demo_files = demo_files or demo_model_files()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(demo_files[role], target)
        used = used or _is_demo_file(target)
    return used


def run_workflow(args) -> int:
    workflow = json.loads(Path(args.workflow).read_text())
    home = Path(args.home)
    demo = _demo_weights(home, workflow) if not args.models_dir else False
    if demo:
        print("DEMO: real weights not found, using tiny random weights: the image will be noise.", file=sys.stderr)
        if args.image_size is None:  # the shipped 1024 px would take minutes on a CPU for a noise image
            args.image_size = DEMO_IMAGE_SIZE
    overrides = {"prompt": args.prompt, "seed": args.seed, "image_size": args.image_size,
                 "num_inference_steps": args.steps}
    for node in workflow.values():
        inputs = node.get("inputs", {})
        for key, value in overrides.items():
            if value is not None and key in inputs and not isinstance(inputs[key], list):
                inputs[key] = value
    server = HeadlessComfy(home, args.models_dir, extra_args=["--disable-api-nodes"], log_name="headless.log")
    server.start()
    try:
        prompt_id = server.queue_prompt(workflow)
        print(f"queued {args.workflow} as {prompt_id}", file=sys.stderr)
        entry = server.wait_prompt(prompt_id)
        if entry["status"].get("status_str") != "success":
            errors = [m for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
            detail = errors[0][1].get("exception_message", "") if errors else json.dumps(entry["status"])[:1000]
            raise SystemExit(f"the workflow failed: {detail}")
        images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
        out = Path(args.out)
        for i, image in enumerate(images):
            suffix = Path(image["filename"]).suffix
            target = out.with_suffix(suffix) if len(images) == 1 else out.with_name(f"{out.stem}_{i}{suffix}")
            target.write_bytes(server.view(image))
            print(f"wrote {target}" + (" (DEMO weights: noise)" if demo else ""))
        return 0
    finally:
        server.stop()


def serve(args) -> int:
    home = Path(args.home)
    extra = prepare_home(home, args.models_dir)
    cmd = comfy_command(home, args.port, args.listen, extra)
    print(f"ComfyUI with the FLUX.1 [dev] Juiced pack: open http://{args.listen}:{args.port} "
          f"(models in {args.models_dir or home / 'models'})", file=sys.stderr)
    return subprocess.call(cmd, cwd=comfyui_dir())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/comfyui.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("serve", "run-workflow"):
        p = sub.add_parser(name)
        p.add_argument("--home", default=os.environ.get("FLUX_COMFYUI_HOME", DEFAULT_HOME),
                       help="ComfyUI's base directory (models/, output/, user/)")
        p.add_argument("--models-dir", default=None, help="an existing ComfyUI-style models folder to use")
        if name == "serve":
            p.add_argument("--port", type=int, default=8188)
            p.add_argument("--listen", default="127.0.0.1")
        else:
            p.add_argument("--workflow", default=str(DEFAULT_WORKFLOW), help="an API-format workflow")
            p.add_argument("--prompt", default=None, help="replaces the workflow's prompt text")
            p.add_argument("--seed", type=int, default=None, help="replaces the workflow's seed")
            p.add_argument("--image-size", type=int, default=None,
                           help=f"replaces the workflow's image_size ({DEMO_IMAGE_SIZE} with demo weights)")
            p.add_argument("--steps", type=int, default=None, help="replaces the workflow's num_inference_steps")
            p.add_argument("--out", default="comfyui_image.jpg", help="where to write the image")
    args = parser.parse_args(argv)
    return serve(args) if args.command == "serve" else run_workflow(args)


if __name__ == "__main__":
    sys.exit(main())
