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


class ModelFileMissing(FileNotFoundError):
    pass


def choices(role: str) -> list[str]:
    """File names a loader offers: the role's folder, then all-in-one checkpoints."""
    names = [n for n in folder_paths.get_filename_list(ROLE_FOLDERS[role]) if n.lower().endswith(MODEL_SUFFIXES)]
    names += [CHECKPOINTS_PREFIX + n for n in folder_paths.get_filename_list("checkpoints")
              if n.lower().endswith(MODEL_SUFFIXES)]
    return names


def resolve(role: str, name: str) -> str:
    """The full path of a chosen file, or a ModelFileMissing error that says how to fix it."""
    from ..flux_core.model_files import MODEL_FILES

    folder, short = ROLE_FOLDERS[role], name
    if name.startswith(CHECKPOINTS_PREFIX):
        folder, short = "checkpoints", name[len(CHECKPOINTS_PREFIX):]
    path = folder_paths.get_full_path(folder, short)
    if path and os.path.isfile(path):
        return path
    searched = ", ".join(folder_paths.get_folder_paths(folder))
    spec = next(m for m in MODEL_FILES if m.role == role)
    note = f" ({spec.note})" if spec.note else ""
    raise ModelFileMissing(f"model file '{name}' was not found in {folder} (searched: {searched}). Get "
                           f"{spec.names[0]} from {spec.url}{note}, put it in models/{folder}/ and refresh the "
                           f"editor's model lists (press R).")
