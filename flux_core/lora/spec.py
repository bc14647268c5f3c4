"""How a LoRA is named on a command line or in a jobs file ("FILE[:STRENGTH]" or {"name", "strength"});
torch-free, so the batch client reads jobs files without torch."""
from __future__ import annotations

import math


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """"PATH" or "PATH:STRENGTH" (strength default 1.0) -> (path, strength). A colon followed by anything
    but a number belongs to the path (C:\\loras\\x.safetensors)."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def normalize_loras(value) -> list[dict]:
    """A jobs-file `loras` value (one entry or a list; each "FILE[:STRENGTH]" or {"name": FILE, "strength": S})
    as [{"name", "strength"}, ...]; ValueError saying what is expected."""
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list):
        raise ValueError('must be a list of LoRAs, each "FILE[:STRENGTH]" or {"name": FILE, "strength": S}')
    out = []
    for entry in value:
        if isinstance(entry, str):
            name, strength = parse_lora_spec(entry)
        elif isinstance(entry, dict) and "name" in entry and set(entry) <= {"name", "strength"}:
            name, strength = entry["name"], entry.get("strength", 1.0)
        else:
            raise ValueError(f'each LoRA must be "FILE[:STRENGTH]" or {{"name": FILE, "strength": S}}; got {entry!r}')
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"a LoRA's name must be a non-empty string; got {name!r}")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise ValueError(f"a LoRA's strength must be a number; got {strength!r}")
        out.append({"name": name, "strength": float(strength)})
    return out
