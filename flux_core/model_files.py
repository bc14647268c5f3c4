"""The model files a user needs, where they go (ComfyUI's standard folders) and where to get them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelFile:
    role: str            # transformer | autoencoder | t5 | clip
    folder: str          # ComfyUI model folder name
    names: tuple[str, ...]  # accepted file names, preferred first
    url: str             # download address of the preferred file
    note: str = ""


# city96's GGUF conversions of the transformer, best quality first (the engine keeps them quantized).
GGUF_TRANSFORMERS = tuple(f"flux1-dev-{kind}.gguf" for kind in (
    "BF16", "F16", "Q8_0", "Q6_K", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_S", "Q4_1", "Q4_0", "Q3_K_S", "Q2_K"))

MODEL_FILES = (
    ModelFile("transformer", "diffusion_models",
              ("flux1-dev.safetensors", "flux1-dev-fp8.safetensors") + GGUF_TRANSFORMERS,
              "https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main/flux1-dev.safetensors",
              "gated: accept the FLUX.1 [dev] licence on Hugging Face first"),
    ModelFile("autoencoder", "vae", ("ae.safetensors",),
              "https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main/ae.safetensors",
              "gated, same licence as the transformer"),
    ModelFile("t5", "text_encoders", ("t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn.safetensors",
                                      "t5xxl_fp8_e4m3fn_scaled.safetensors"),
              "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors",
              "t5xxl_fp8_e4m3fn.safetensors from the same place halves the memory"),
    ModelFile("clip", "text_encoders", ("clip_l.safetensors",),
              "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors"),
)


def find_model_files(models_dir) -> dict[str, Path | None]:
    """The first accepted file of each role found under models_dir/<folder>/, or None."""
    root = Path(models_dir)
    found: dict[str, Path | None] = {}
    for spec in MODEL_FILES:
        found[spec.role] = next((root / spec.folder / n for n in spec.names if (root / spec.folder / n).is_file()),
                                None)
    return found


def missing_files_message(models_dir, missing_roles) -> str:
    lines = [f"FLUX.1 [dev] weights are missing under {Path(models_dir).resolve()}. Get these files:"]
    for spec in MODEL_FILES:
        if spec.role in missing_roles:
            lines.append(f"  {spec.folder}/{spec.names[0]}  <-  {spec.url}" + (f"  ({spec.note})" if spec.note else ""))
    lines.append("Or pass explicit paths (--transformer, --vae, --t5, --clip), or try --demo to see the whole "
                 "path run on tiny random weights.")
    return "\n".join(lines)
