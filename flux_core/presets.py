"""User-facing choices of the design table: aspect ratios, sizes, output formats and their defaults."""
from __future__ import annotations

ASPECT_RATIOS = ["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"]
OUTPUT_FORMATS = ["jpg", "png", "webp"]

DEFAULT_ASPECT_RATIO = "1:1"
DEFAULT_STEPS = 28
DEFAULT_GUIDANCE = 3.5
DEFAULT_IMAGE_SIZE = 1024
DEFAULT_OUTPUT_FORMAT = "jpg"
DEFAULT_OUTPUT_QUALITY = 80

STEPS_RANGE = (1, 50)
GUIDANCE_RANGE = (0.0, 10.0)
IMAGE_SIZE_RANGE = (64, 2048)
QUALITY_RANGE = (1, 100)
SEED_MAX = 2**63 - 1
PIXEL_MULTIPLE = 16  # 8x autoencoder times 2x2 patches


def _round_to_multiple(value: float, multiple: int = PIXEL_MULTIPLE) -> int:
    return max(multiple, int(value / multiple + 0.5) * multiple)  # half rounds up, not to even


def dimensions(aspect_ratio: str = DEFAULT_ASPECT_RATIO, image_size: int = DEFAULT_IMAGE_SIZE) -> tuple[int, int]:
    """(width, height) for an aspect ratio with the longest side near image_size, both multiples of 16."""
    check_choice("aspect_ratio", aspect_ratio, ASPECT_RATIOS)
    check_range("image_size", image_size, IMAGE_SIZE_RANGE)
    w_ratio, h_ratio = (int(x) for x in aspect_ratio.split(":"))
    longest = _round_to_multiple(image_size)
    if w_ratio >= h_ratio:
        return longest, _round_to_multiple(image_size * h_ratio / w_ratio)
    return _round_to_multiple(image_size * w_ratio / h_ratio), longest


def check_choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def check_range(name: str, value, bounds):
    low, high = bounds
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be a number from {low} to {high}; got {value!r}")
    return value
