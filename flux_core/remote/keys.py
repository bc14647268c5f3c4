"""API keys: from the environment, or from a keys file outside any graph; never from a widget.

Lookup order for a provider: its environment variable, then the keys file. The keys file is
FLUX_JUICED_KEYS_FILE, else $XDG_CONFIG_HOME/flux-juiced/keys.toml (~/.config/flux-juiced/keys.toml), with
lines such as `BFL_API_KEY = "..."` (the provider's name, `bfl = "..."`, works too; a [keys] table is
fine). Every key the process knows is also a string to scrub: redact() replaces it in any text that
leaves the client (errors, logs, metadata).
"""
from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

log = logging.getLogger("flux_juiced.remote")

# provider name -> environment variable holding its key
KEY_ENV = {
    "inference.sh": "INFERENCE_API_KEY",
    "bfl": "BFL_API_KEY",
    "fal": "FAL_KEY",
    "replicate": "REPLICATE_API_TOKEN",
    "cometapi": "COMETAPI_API_KEY",
}
KEYS_FILE_ENV = "FLUX_JUICED_KEYS_FILE"
MASK = "***"
_MIN_SECRET = 6  # shorter strings would mask ordinary words; real keys are far longer

_file_keys: dict[str, str] = {}  # keys read from the file, kept for redaction


def keys_file_path() -> Path:
    explicit = os.environ.get(KEYS_FILE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or (os.environ.get("APPDATA") if os.name == "nt" else None)
    return (Path(base) if base else Path.home() / ".config") / "flux-juiced" / "keys.toml"


_LINE = re.compile(r"""^\s*([A-Za-z0-9_.\-"]+)\s*=\s*(?:"([^"]*)"|'([^']*)')\s*(?:#.*)?$""")


def _parse(text: str) -> dict[str, str]:
    """NAME = "value" pairs at the top level or in any table (a subset of TOML; tomllib is 3.11+)."""
    found = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if match:
            found[match.group(1).strip('"')] = match.group(2) if match.group(2) is not None else match.group(3)
    return found


def read_keys_file(path: Path | None = None) -> dict[str, str]:
    """Provider name -> key from the keys file ({} when there is none)."""
    path = path or keys_file_path()
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as exc:
        log.warning("FLUX.1 Juiced: cannot read the keys file %s: %s", path, exc.strerror)
        return {}
    if os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("FLUX.1 Juiced: the keys file %s is readable by other users; chmod 600 it", path)
    raw = _parse(text)
    keys = {}
    for provider, env in KEY_ENV.items():
        value = raw.get(env) or raw.get(provider)
        if value:
            keys[provider] = value.strip()
    _file_keys.update(keys)
    return keys


def get_key(provider: str) -> str | None:
    """The key for a provider, or None when neither the environment nor the keys file has one."""
    env = KEY_ENV[provider]
    value = os.environ.get(env, "").strip()
    if value:
        return value
    return read_keys_file().get(provider)


def where_keys_go(provider: str) -> str:
    return (f"set the environment variable {KEY_ENV[provider]} (in the shell that starts ComfyUI), or put "
            f'{KEY_ENV[provider]} = "..." in {keys_file_path()}')


def _secrets() -> list[str]:
    values = [os.environ.get(env, "") for env in KEY_ENV.values()] + list(_file_keys.values())
    parts = []
    for value in values:
        value = value.strip()
        parts.append(value)
        parts += value.split(":") if ":" in value else []  # fal keys are KEY_ID:KEY_SECRET
    return sorted({p for p in parts if len(p) >= _MIN_SECRET}, key=len, reverse=True)


def redact(text):
    """text with every known key replaced by ***; other values are returned unchanged."""
    if not isinstance(text, str) or not text:
        return text
    for secret in _secrets():
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def redact_data(value):
    """redact() through dicts and lists (for metadata before it is written anywhere)."""
    if isinstance(value, dict):
        return {redact(k): redact_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_data(v) for v in value]
    return redact(value)
