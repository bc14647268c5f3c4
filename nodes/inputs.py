"""Widget definitions shared by the pack's nodes: the design table's inputs with their tooltips."""
from __future__ import annotations

import secrets

from ..flux_core import presets
from ..flux_core.speed.presets import DEFAULT_SPEED_MODE, SPEED_MODES  # noqa: F401 (the nodes' choices)

CATEGORY = "FLUX.1 [dev] Juiced"


def prompt():
    return ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                       "tooltip": "What to draw. FLUX follows long, plain-language descriptions well."})


def aspect_ratio():
    return (presets.ASPECT_RATIOS, {"default": presets.DEFAULT_ASPECT_RATIO,
                                    "tooltip": "Width:height of the image; both sides are multiples of 16."})


def speed_mode():
    return (SPEED_MODES, {"default": DEFAULT_SPEED_MODE,
                          "tooltip": "Trade of time for fidelity (step caching, compilation, precision)."})


def steps():
    low, high = presets.STEPS_RANGE
    return ("INT", {"default": presets.DEFAULT_STEPS, "min": low, "max": high,
                    "tooltip": "Sampling steps. 28 is the usual FLUX.1 [dev] setting; fewer is faster and rougher."})


def guidance():
    low, high = presets.GUIDANCE_RANGE
    return ("FLOAT", {"default": presets.DEFAULT_GUIDANCE, "min": low, "max": high, "step": 0.1,
                      "tooltip": "Distilled guidance fed to the model (not CFG): higher follows the prompt more "
                                 "literally, lower looks more natural. 3.5 is the usual value."})


def seed():
    return ("INT", {"default": -1, "min": -1, "max": presets.SEED_MAX, "control_after_generate": True,
                    "tooltip": "Noise seed; -1 picks a random one (the seed used is an output and is saved with "
                               "the image). Image i of a batch uses seed + i."})


def image_size():
    low, high = presets.IMAGE_SIZE_RANGE
    return ("INT", {"default": presets.DEFAULT_IMAGE_SIZE, "min": low, "max": high, "step": 16,
                    "tooltip": "Longest side in pixels; the other side follows the aspect ratio."})


def output_format():
    return (presets.OUTPUT_FORMATS, {"default": presets.DEFAULT_OUTPUT_FORMAT,
                                     "tooltip": "File format of the saved image. png and webp keep the workflow "
                                                "inside the file; jpg keeps it when it fits."})


def output_quality():
    low, high = presets.QUALITY_RANGE
    return ("INT", {"default": presets.DEFAULT_OUTPUT_QUALITY, "min": low, "max": high,
                    "tooltip": "Compression quality for jpg and webp (ignored for png)."})


def filename_prefix(default: str = "flux_juiced/FLUX"):
    return ("STRING", {"default": default,
                       "tooltip": "File name prefix inside the output folder; may contain a subfolder. Existing "
                                  "files are never overwritten."})


def job_inputs() -> dict:
    """The design table's inputs, in its order: the required inputs of the all-in-one node, local or remote."""
    return {"prompt": prompt(), "aspect_ratio": aspect_ratio(), "speed_mode": speed_mode(),
            "num_inference_steps": steps(), "guidance": guidance(), "seed": seed(), "image_size": image_size(),
            "output_format": output_format(), "output_quality": output_quality()}


def changed_when_random(seed) -> str:
    """IS_CHANGED for nodes with a seed: -1 draws a new seed every run, so the host must not reuse a cached
    result (a fresh token rather than NaN: the host copies it into the graph saved in the image, as JSON)."""
    return secrets.token_hex(8) if seed == -1 else ""


def validate(*checks) -> bool | str:
    """Run presets checks (callables raising ValueError) for VALIDATE_INPUTS: True, or the first message.

    Inputs named in VALIDATE_INPUTS skip the host's own combo and range checks, so they are redone here.
    """
    for check in checks:
        try:
            check()
        except ValueError as exc:
            return str(exc)
    return True
