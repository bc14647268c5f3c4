"""Aspect ratios and sizes, input validation, and image files with metadata that never overwrite."""
import json

import pytest
from PIL import Image

from flux_core import presets
from flux_core.image_files import read_settings, save_image


@pytest.mark.parametrize("ratio", presets.ASPECT_RATIOS)
@pytest.mark.parametrize("size", [1024, 1000, 768, 512, 1440, 2048, 64])
def test_every_aspect_ratio_gives_multiples_of_16_near_the_ratio(ratio, size):
    w, h = presets.dimensions(ratio, size)
    assert w % 16 == 0 and h % 16 == 0 and w >= 16 and h >= 16
    rw, rh = (int(x) for x in ratio.split(":"))
    assert max(w, h) == max(16, int(size / 16 + 0.5) * 16)
    # Rounding to 16 moves the ratio by at most half a 16-pixel step on the short side.
    short_exact = size * min(rw, rh) / max(rw, rh)
    assert abs(min(w, h) - short_exact) <= 8 or min(w, h) == 16
    assert (w >= h) == (rw >= rh)


def test_known_sizes():
    assert presets.dimensions("1:1", 1024) == (1024, 1024)
    assert presets.dimensions("16:9", 1024) == (1024, 576)
    assert presets.dimensions("9:16", 1024) == (576, 1024)
    assert presets.dimensions("21:9", 1024) == (1024, 432)
    assert presets.dimensions("2:3", 1024) == (688, 1024)


@pytest.mark.parametrize("ratio,size", [("5:7", 1024), ("1:1", 32), ("1:1", 4096), ("1:1", "big")])
def test_bad_inputs_are_refused_with_the_input_named(ratio, size):
    with pytest.raises(ValueError) as err:
        presets.dimensions(ratio, size)
    assert ("aspect_ratio" in str(err.value)) or ("image_size" in str(err.value))


@pytest.mark.parametrize("fmt", presets.OUTPUT_FORMATS)
def test_images_carry_metadata_and_are_never_overwritten(tmp_path, fmt):
    img = Image.new("RGB", (32, 16), (200, 100, 50))
    meta = {"prompt": "an orange", "seed": 42, "guidance": 3.5}
    first = save_image(img, tmp_path / f"out.{fmt}", fmt, quality=90, metadata=meta)
    second = save_image(img, tmp_path / f"out.{fmt}", fmt, quality=90, metadata=meta)
    assert first != second and first.exists() and second.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, second.name])  # no temp files left
    with Image.open(second) as back:
        assert back.size == (32, 16)
        assert back.format == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
        if fmt == "png":
            assert back.text["prompt"] == "an orange" and back.text["seed"] == "42"
        else:
            assert json.loads(back.getexif()[0x010E]) == meta
    # read back from the bytes (as the batch client does with a server's image), graphs left out
    graphs = {"prompt": {"1": {"class_type": "X", "inputs": {}}}, "workflow": {"nodes": []}}
    with_graphs = save_image(img, tmp_path / f"g.{fmt}", fmt, metadata=meta, graphs=graphs)
    assert read_settings(with_graphs.read_bytes()) == meta
    assert read_settings(b"not an image") == {}


def test_quality_changes_jpeg_size(tmp_path):
    import random

    rnd = random.Random(0)
    img = Image.frombytes("RGB", (64, 64), bytes(rnd.randrange(256) for _ in range(64 * 64 * 3)))
    low = save_image(img, tmp_path / "low.jpg", "jpg", quality=5)
    high = save_image(img, tmp_path / "high.jpg", "jpg", quality=95)
    assert low.stat().st_size < high.stat().st_size / 2
