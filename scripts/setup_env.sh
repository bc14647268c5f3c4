#!/usr/bin/env bash
# Create or update .venv. "runtime": torch + the pack's dependencies, plus a copy of the ComfyUI host
# (its bundled tokenizer files serve the engine too). "test": also the test oracles and the host's own
# requirements. Re-runs are cheap: a stamp records what was installed from which pyproject.
set -euo pipefail
cd "$(dirname "$0")/.."
level="${1:-runtime}"
PY="${PYTHON:-python3}"
# torch is installed here, not listed as a dependency; override for another CUDA/CPU build.
TORCH_SPEC="${FLUX_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
stamp=".venv/.flux-${level}-$(cat pyproject.toml scripts/setup_env.sh scripts/install_comfyui.py | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  echo "setting up .venv ($level); the first time takes a few minutes" >&2
  .venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" $TORCH_SPEC
  if [ "$level" = test ]; then "${pip[@]}" -e ".[test]"; else "${pip[@]}" -e .; fi
  .venv/bin/python scripts/install_comfyui.py >/dev/null
  touch "$stamp"
fi
