"""Writing images as jpg, png or webp with the generation settings in their metadata, never overwriting."""
from __future__ import annotations

import json
import os
from pathlib import Path

FORMAT_NAMES = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def format_from_path(path) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in FORMAT_NAMES:
        raise ValueError(f"cannot tell the image format from '{path}': use a .jpg, .png or .webp name")
    return "jpg" if suffix == "jpeg" else suffix


def _candidates(path: Path):
    """path, then path with _1, _2, ... before the suffix."""
    yield path
    n = 1
    while True:
        yield path.with_name(f"{path.stem}_{n}{path.suffix}")
        n += 1


def _publish(tmp: Path, path: Path, overwrite: bool) -> Path:
    """Move a finished temp file to its name; without overwrite, claim the first free name atomically."""
    if overwrite:
        os.replace(tmp, path)
        return path
    for candidate in _candidates(path):
        try:
            os.link(tmp, candidate)  # fails if the name exists, even when another process just took it
        except FileExistsError:
            continue
        except OSError:  # file systems without hard links
            if candidate.exists():
                continue
            os.replace(tmp, candidate)
            return candidate
        os.unlink(tmp)
        return candidate
    raise AssertionError("unreachable")


# Where ComfyUI itself keeps graphs in EXIF (its animated WebP saver): tag -> the graph it holds.
EXIF_GRAPH_TAGS = {"prompt": 0x0110, "workflow": 0x010F}
EXIF_DESCRIPTION = 0x010E
JPEG_EXIF_LIMIT = 65_000  # a JPEG APP1 segment holds at most 64 KiB


def save_image(image, path, output_format: str | None = None, quality: int = 80, metadata: dict | None = None,
               overwrite: bool = False, graphs: dict | None = None) -> Path:
    """Save a PIL image without overwriting (unless asked) and never leaving a half-written file.

    metadata (settings, seed, ...) goes to PNG text chunks, or as JSON to the EXIF description of jpg/webp.
    In a PNG that also holds the graphs, a setting named like a graph is stored as "<name>_text"
    (the prompt text as "prompt_text").
    graphs ({"prompt": api_graph, "workflow": ui_graph}) are embedded as ComfyUI does: PNG text chunks, or
    EXIF entries "prompt:<json>" / "workflow:<json>" (left out of a JPEG when they would not fit).
    """
    from PIL import Image, PngImagePlugin

    output_format = (output_format or format_from_path(path)).lower()
    if output_format not in FORMAT_NAMES:
        raise ValueError(f"output_format must be jpg, png or webp; got {output_format!r}")
    path = Path(path)
    if path.suffix.lower().lstrip(".") not in (output_format, "jpeg" if output_format == "jpg" else output_format):
        path = path.with_suffix("." + output_format)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict = {}
    graphs = {k: v for k, v in (graphs or {}).items() if v is not None}
    if output_format == "png":
        info = PngImagePlugin.PngInfo()
        # The graphs keep ComfyUI's chunk names; a setting of the same name (the prompt text next to the
        # "prompt" graph) goes under "<name>_text" rather than a second chunk that would hide one of them.
        settings = [(f"{key}_text" if key in graphs else key, value) for key, value in (metadata or {}).items()]
        for key, value in settings + list(graphs.items()):
            info.add_text(key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
        kwargs["pnginfo"] = info
    else:
        kwargs["quality"] = int(quality)
        exif = Image.Exif()
        if metadata:
            # EXIF text is ASCII: non-ASCII characters would be lost, so JSON escapes them (as ComfyUI does)
            exif[EXIF_DESCRIPTION] = json.dumps(metadata)
        for key, value in graphs.items():
            entry = f"{key}:{json.dumps(value)}"
            if output_format == "jpg" and len(exif.tobytes()) + len(entry.encode()) > JPEG_EXIF_LIMIT:
                continue
            exif[EXIF_GRAPH_TAGS[key]] = entry
        if len(exif):
            kwargs["exif"] = exif.tobytes()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")  # no half-written image under a final name
    try:
        image.save(tmp, format=FORMAT_NAMES[output_format], **kwargs)
        return _publish(tmp, path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)


def read_settings(data: bytes) -> dict:
    """The settings save_image wrote into an image (its `metadata`), from the file's bytes; {} when there
    are none or the bytes are not an image. PNG values that were JSON come back decoded; the graphs are left
    out. (A PNG stores every value as text, so a string that reads as JSON comes back as that JSON value.)"""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError):
        return {}
    if image.format == "PNG":
        settings = {}
        for key, value in getattr(image, "text", {}).items():
            if key in EXIF_GRAPH_TAGS:
                continue
            if key.endswith("_text") and key[:-5] in EXIF_GRAPH_TAGS:  # renamed next to a graph (save_image)
                key = key[:-5]
            try:
                settings[key] = json.loads(value)
            except json.JSONDecodeError:
                settings[key] = value
        return settings
    try:
        settings = json.loads(image.getexif().get(EXIF_DESCRIPTION, "{}"))
    except (json.JSONDecodeError, TypeError):
        return {}
    return settings if isinstance(settings, dict) else {}
