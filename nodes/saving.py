"""Saving IMAGE batches to the host's output folder as jpg, png or webp, with the settings, the seed and
the graphs in the file (as the host does), never overwriting an existing file."""
from __future__ import annotations

import folder_paths

from ..flux_core.image_files import save_image

# Native nodes whose text inputs are the prompt, for the human-readable summary.
_PROMPT_INPUTS = {"CLIPTextEncode": "text", "CLIPTextEncodeFlux": "t5xxl", "FluxJuicedTextToImage": "prompt"}


def summarize_graph(prompt: dict | None) -> dict:
    """The prompt text and the pack's node settings found in an API-format graph."""
    summary: dict = {}
    for node in (prompt or {}).values():
        kind, inputs = node.get("class_type", ""), node.get("inputs", {})
        text = inputs.get(_PROMPT_INPUTS.get(kind, ""))
        if isinstance(text, str) and "prompt" not in summary:
            summary["prompt"] = text
        if kind.startswith("FluxJuiced"):
            summary[kind] = {k: v for k, v in inputs.items() if not isinstance(v, list)}
    return summary


def to_pil(image):
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to("cpu").byte().numpy()
    return Image.fromarray(array[..., :3], mode="RGB")


def save_batch(images, filename_prefix: str, output_format: str, quality: int, parameters: dict,
               prompt=None, extra_pnginfo=None) -> list[dict]:
    """Write each image of an IMAGE batch (B, H, W, C in [0, 1]); returns the host's UI entries."""
    from comfy.cli_args import args

    output_dir = folder_paths.get_output_directory()
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
        filename_prefix, output_dir, images[0].shape[1], images[0].shape[0])
    with_metadata = not getattr(args, "disable_metadata", False)
    graphs = {"prompt": prompt, "workflow": (extra_pnginfo or {}).get("workflow")} if with_metadata else None
    results = []
    for i, image in enumerate(images):
        meta = dict(parameters, **({"seed": parameters["seeds"][i]} if "seeds" in parameters else {}))
        meta.pop("seeds", None)
        target = f"{folder}/{name}_{counter + i:05}_.{output_format}"
        written = save_image(to_pil(image), target, output_format, quality, metadata=meta if with_metadata else None,
                             graphs=graphs)
        results.append({"filename": written.name, "subfolder": subfolder, "type": "output"})
    return results
