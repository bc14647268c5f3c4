"""ComfyUI's model folders for the pack's loaders: listing choices and resolving a chosen name to a file.

Names from the checkpoints folder appear as "checkpoints/<name>" so all-in-one files can feed every
loader. A name that is not on disk is not refused by validation: the loader fails at run time with a
message naming the file, the folders searched and where to download it.
"""
from __future__ import annotations

import os

import folder_paths

CHECKPOINTS_PREFIX = "checkpoints/"
# role -> the folder it reads (plus checkpoints/ for all-in-one files)
ROLE_FOLDERS = {"transformer": "diffusion_models", "autoencoder": "vae", "t5": "text_encoders", "clip": "text_encoders"}
MODEL_SUFFIXES = (".safetensors", ".sft")
# The host lists diffusion_models with its own (pickle/safetensors) extensions only; GGUF transformers are
# listed through a folder key of the pack's own that mirrors diffusion_models' paths.
GGUF_SUFFIX = ".gguf"
GGUF_FOLDER = "flux_juiced_diffusion_models_gguf"


class ModelFileMissing(FileNotFoundError):
    pass


def _gguf_folder() -> str:
    """Mirror diffusion_models' paths (extra_model_paths.yaml and later additions included) under GGUF_FOLDER,
    with the host's public folder API; the key has no extension filter, so choices() filters by suffix."""
    for path in folder_paths.get_folder_paths("diffusion_models"):
        folder_paths.add_model_folder_path(GGUF_FOLDER, path)
    return GGUF_FOLDER


def choices(role: str) -> list[str]:
    """File names a loader offers: the role's folder (plus GGUF files for the transformer), then all-in-one
    checkpoints."""
    names = [n for n in folder_paths.get_filename_list(ROLE_FOLDERS[role]) if n.lower().endswith(MODEL_SUFFIXES)]
    if role == "transformer":
        names += [n for n in folder_paths.get_filename_list(_gguf_folder()) if n.lower().endswith(GGUF_SUFFIX)]
    names += [CHECKPOINTS_PREFIX + n for n in folder_paths.get_filename_list("checkpoints")
              if n.lower().endswith(MODEL_SUFFIXES)]
    return names


def resolve(role: str, name: str) -> str:
    """The full path of a chosen file, or a ModelFileMissing error that says how to fix it."""
    from ..flux_core.model_files import MODEL_FILES

    folder, short = ROLE_FOLDERS[role], name
    if name.startswith(CHECKPOINTS_PREFIX):
        folder, short = "checkpoints", name[len(CHECKPOINTS_PREFIX):]
    lookup = _gguf_folder() if role == "transformer" and short.lower().endswith(GGUF_SUFFIX) else folder
    path = folder_paths.get_full_path(lookup, short)
    if path and os.path.isfile(path):
        return path
    searched = ", ".join(folder_paths.get_folder_paths(folder))
    spec = next(m for m in MODEL_FILES if m.role == role)
    note = f" ({spec.note})" if spec.note else ""
    raise ModelFileMissing(f"model file '{name}' was not found in {folder} (searched: {searched}). Get "
                           f"{spec.names[0]} from {spec.url}{note}, put it in models/{folder}/ and refresh the "
                           f"editor's model lists (press R).")
