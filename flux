#!/usr/bin/env bash
# One entry point for a fresh machine. It creates .venv on first use and keeps it in step with pyproject.toml.
#   ./flux demo                 generate an image from tiny random weights (no downloads, runs on a CPU)
#   ./flux generate ARGS...     python -m flux_core generate ARGS... (see --help; --provider NAME runs it hosted)
#   ./flux batch JOBS --out DIR python -m flux_core batch: many images from a JSON-lines jobs file, resumable
#   ./flux test [PYTEST ARGS]   install the test oracles and the real ComfyUI host, then run the test suite
#   ./flux comfyui [ARGS...]    start ComfyUI 0.3.75 with this pack for the graph editor (--models-dir DIR, --port N)
#   ./flux workflow [ARGS...]   run the text-to-image workflow headlessly over the API and write the image
#   ./flux python ARGS...       run the project's Python
set -euo pipefail
cd "$(dirname "$0")"
cmd="${1:-help}"; shift || true
case "$cmd" in
  demo)     scripts/setup_env.sh runtime
            exec .venv/bin/python -m flux_core generate --demo --prompt "a juicy orange on a wooden table" --out demo.jpg "$@" ;;
  generate) scripts/setup_env.sh runtime; exec .venv/bin/python -m flux_core generate "$@" ;;
  batch)    scripts/setup_env.sh runtime; exec .venv/bin/python -m flux_core batch "$@" ;;
  test)     scripts/setup_env.sh test; exec .venv/bin/python -m pytest "$@" ;;
  comfyui)  scripts/setup_env.sh test; exec .venv/bin/python scripts/comfyui.py serve "$@" ;;
  workflow) scripts/setup_env.sh test; exec .venv/bin/python scripts/comfyui.py run-workflow "$@" ;;
  python)   scripts/setup_env.sh runtime; exec .venv/bin/python "$@" ;;
  *)        sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; [ "$cmd" = help ] ;;
esac
