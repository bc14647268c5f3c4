"""Describing the machine a benchmark ran on (never its host name), for result files."""
from __future__ import annotations

import os
import platform
import re


def machine() -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram = float("nan")
    info = {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": ram, "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version()}
    try:
        import torch

        info.update(torch=torch.__version__, threads=torch.get_num_threads())
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def machine_slug(m: dict) -> str:
    """A file-name-safe description: GPU when there is one, else CPU, cores and RAM."""
    if m.get("gpu"):
        return re.sub(r"[^a-z0-9]+", "-", m["gpu"].lower()).strip("-")
    cpu = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*", "", m["cpu"].lower())
    cpu = re.sub(r"[^a-z0-9]+", "-", cpu).strip("-")
    return f"{cpu}-{m['cores']}cores-{round(m['ram_gib'])}gib"
