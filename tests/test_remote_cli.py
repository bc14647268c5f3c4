"""`python -m flux_core generate --provider NAME`: the same job as the local CLI, run at a provider."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from fake_providers.testing import start_fake  # noqa: F401 (fixture)
from flux_core.cli import main

REPO = Path(__file__).resolve().parent.parent
FAST_ENV = {"FLUX_JUICED_REMOTE_POLL_INTERVAL_S": "0.02", "FLUX_JUICED_REMOTE_BACKOFF_BASE_S": "0.02",
            "FLUX_JUICED_REMOTE_DEADLINE_S": "10"}


def test_cli_runs_at_the_provider_and_saves_with_metadata(start_fake, monkeypatch, tmp_path, capsys):
    for key, value in FAST_ENV.items():
        monkeypatch.setenv(key, value)
    fake = start_fake("bfl")
    out = tmp_path / "orange.png"
    code = main(["generate", "--provider", "bfl", "--prompt", "a juicy orange", "--out", str(out), "--seed", "5",
                 "--aspect-ratio", "16:9", "--image-size", "512", "--num-images", "2", "--device", "cuda",
                 "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "--device ignored: the job runs at bfl" in captured.err
    assert "note: speed_mode 'Extra Juiced 🔥 (more speed)' not used" in captured.err
    assert [json.loads(r.raw)["seed"] for r in fake.received("submit")] == [5, 6]  # image i uses seed + i
    written = sorted(tmp_path.glob("orange*.png"))
    assert [p.name for p in written] == ["orange.png", "orange_1.png"]
    with Image.open(written[1]) as image:
        assert image.size == (512, 288)
        text = dict(image.text)
    assert text["provider"] == "bfl" and text["seed"] == "6" and text["task_id"] in captured.out
    assert fake.key not in json.dumps(text) + captured.out + captured.err


def test_cli_refuses_demo_and_unknown_providers(capsys):
    assert main(["generate", "--provider", "bfl", "--prompt", "x", "--demo"]) == 2
    assert "--demo" in capsys.readouterr().err
    assert main(["generate", "--provider", "midjourney", "--prompt", "x", "--out", "x.png"]) == 2
    assert "inference.sh, bfl, fal, replicate, cometapi" in capsys.readouterr().err


def test_cli_as_a_subprocess_without_a_key_says_where_to_put_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("FAL_KEY",)}
    env["FLUX_JUICED_KEYS_FILE"] = str(tmp_path / "none.toml")
    done = subprocess.run([sys.executable, "-m", "flux_core", "generate", "--provider", "fal", "--prompt", "x",
                           "--out", str(tmp_path / "x.jpg")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "FAL_KEY" in done.stderr and "import torch" not in done.stderr
