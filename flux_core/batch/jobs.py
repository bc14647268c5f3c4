"""Jobs files: one JSON object per line, validated with the line number in every error, expanded into
work items (one per image) whose ids stay the same from run to run, so a rerun can tell what is done.

A line holds the design table's inputs (only `prompt` is required), optional `loras`, `variations` (images
per prompt, image i made from seed + i) and an optional `id`. A line may also be a bare JSON string: the
prompt alone. Blank lines and lines starting with `#` are skipped.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import presets
from ..lora.spec import normalize_loras

MAX_VARIATIONS = 10_000
DEFAULTS = {
    "aspect_ratio": presets.DEFAULT_ASPECT_RATIO,
    "speed_mode": None,  # the engine's default mode, filled in by _speed_mode (needs the speed presets)
    "num_inference_steps": presets.DEFAULT_STEPS,
    "guidance": presets.DEFAULT_GUIDANCE,
    "seed": -1,
    "image_size": presets.DEFAULT_IMAGE_SIZE,
    "output_format": presets.DEFAULT_OUTPUT_FORMAT,
    "output_quality": presets.DEFAULT_OUTPUT_QUALITY,
    "loras": [],  # [{"name", "strength"}]; names resolve where the jobs run (engine: files; ComfyUI: its loras)
}
INPUTS = ("prompt", *DEFAULTS)          # what makes an image; a job's fingerprint covers these
FIELDS = (*INPUTS, "variations", "id")  # everything a line may hold
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class JobError(ValueError):
    """A line of a jobs file that cannot be run; the message names the file, the line and the field."""


@dataclass(frozen=True)
class Job:
    id: str
    line: int
    inputs: dict        # every input of INPUTS, defaults filled in; seed may be -1
    variations: int
    fingerprint: str    # hash of the inputs, less the seed when it is -1 (then the drawn seed is recorded)


@dataclass(frozen=True)
class WorkItem:
    """One image to make: a job's inputs with the exact seed of this variation."""

    id: str
    job: str
    line: int
    variation: int
    seed: int
    inputs: dict
    width: int
    height: int
    fingerprint: str

    @property
    def group_key(self) -> tuple:
        """Items with the same key can share one batched generate() call."""
        i = self.inputs
        return (self.width, self.height, i["num_inference_steps"], i["guidance"], i["speed_mode"],
                tuple((lora["name"], lora["strength"]) for lora in i["loras"]))

    def to_dict(self) -> dict:
        return asdict(self)


def _speed_mode(value):
    from ..speed import presets as speed_presets  # torch-free (speed/settings.py)

    if value is None:
        return speed_presets.DEFAULT_SPEED_MODE
    mode = speed_presets.resolve(value)
    return speed_presets.OFF if mode is None else mode.name


def _integer(name, value, bounds):
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer; got {value!r}")
    return presets.check_range(name, value, bounds)


def _check(name: str, value):
    """The normalized value of one input, or ValueError saying what is expected."""
    if name == "prompt":
        if not isinstance(value, str) or not value.strip():
            raise ValueError("must be a non-empty string")
        return value
    if name == "aspect_ratio":
        return presets.check_choice(name, value, presets.ASPECT_RATIOS)
    if name == "speed_mode":
        return _speed_mode(value)
    if name == "num_inference_steps":
        return _integer(name, value, presets.STEPS_RANGE)
    if name == "guidance":
        return float(presets.check_range(name, value, presets.GUIDANCE_RANGE))
    if name == "seed":
        if value == -1:
            return -1
        return _integer(name, value, (0, presets.SEED_MAX))
    if name == "image_size":
        return _integer(name, value, presets.IMAGE_SIZE_RANGE)
    if name == "output_format":
        value = "jpg" if value == "jpeg" else value
        return presets.check_choice(name, value, presets.OUTPUT_FORMATS)
    if name == "output_quality":
        return _integer(name, value, presets.QUALITY_RANGE)
    if name == "loras":
        return normalize_loras(value)
    if name == "variations":
        return _integer(name, value, (1, MAX_VARIATIONS))
    if name == "id":
        if not isinstance(value, str) or not _ID.fullmatch(value):
            raise ValueError("must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return value
    raise AssertionError(name)


def _slug(prompt: str, length: int = 32) -> str:
    words = re.findall(r"[a-z0-9]+", prompt.lower())
    slug = ""
    for word in words:
        if len(slug) + len(word) + 1 > length:
            break
        slug = f"{slug}-{word}" if slug else word
    return slug or "job"


def fingerprint(inputs: dict) -> str:
    """Stable across runs and machines: sorted-key JSON of the inputs; a random seed (-1) is left out, and so
    is an empty `loras` (jobs written before LoRAs existed keep their fingerprints)."""
    key = {k: v for k, v in inputs.items() if not (k == "seed" and v == -1) and not (k == "loras" and not v)}
    return hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def parse_line(text: str, line: int, source: str = "jobs", defaults: dict | None = None) -> dict | None:
    """A line's validated fields (inputs with defaults, variations, id), or None for blank/comment lines."""
    stripped = text.strip()
    if not stripped or stripped.startswith("#"):
        return None
    where = f"{source} line {line}"
    try:
        raw = json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise JobError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(raw, str):
        raw = {"prompt": raw}
    if not isinstance(raw, dict):
        raise JobError(f"{where}: expected a JSON object (or a string: the prompt), got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise JobError(f"{where}: unknown field {unknown[0]!r}; a job may have {', '.join(FIELDS)}")
    if "prompt" not in raw:
        raise JobError(f"{where}: field 'prompt' is required")
    merged = {**DEFAULTS, **(defaults or {}), "variations": 1, **raw}
    fields = {}
    for name in FIELDS:
        if name not in merged:
            continue
        try:
            fields[name] = _check(name, merged[name])
        except ValueError as exc:
            message = str(exc)
            if message.startswith(name + " "):
                message = message[len(name) + 1:]
            if "got" not in message:
                message = f"{message}; got {merged[name]!r}"
            raise JobError(f"{where}: field {name!r}: {message}") from None
    seed, count = fields["seed"], fields["variations"]
    if seed != -1 and seed + count - 1 > presets.SEED_MAX:
        raise JobError(f"{where}: field 'seed': seed + variations - 1 must stay at most {presets.SEED_MAX}")
    return fields


def parse_jobs(lines, source: str = "jobs", defaults: dict | None = None) -> list[Job]:
    """Jobs from the lines of a jobs file. defaults replace the design table's defaults for missing inputs.

    A job without an id gets "<prompt slug>-<fingerprint>", plus "-2", "-3", ... for repeated identical
    lines, so ids do not move when other lines are added, removed or reordered.
    """
    jobs, seen_ids, repeats = [], {}, {}
    for number, text in enumerate(lines, start=1):
        fields = parse_line(text, number, source, defaults)
        if fields is None:
            continue
        inputs = {name: fields[name] for name in INPUTS}
        print_ = fingerprint(inputs)
        if "id" in fields:
            job_id = fields["id"]
        else:
            base = f"{_slug(inputs['prompt'])}-{print_[:8]}"
            repeats[base] = repeats.get(base, 0) + 1
            job_id = base if repeats[base] == 1 else f"{base}-{repeats[base]}"
        if job_id in seen_ids:
            raise JobError(f"{source} line {number}: field 'id': {job_id!r} is already used on line {seen_ids[job_id]}")
        seen_ids[job_id] = number
        jobs.append(Job(job_id, number, inputs, fields["variations"], print_))
    if not jobs:
        raise JobError(f"{source}: no jobs (each line: a JSON object with at least a prompt)")
    return jobs


def load_jobs(path, defaults: dict | None = None) -> list[Job]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError(f"cannot read the jobs file {path}: {exc}") from None
    return parse_jobs(text.splitlines(), source=path.name, defaults=defaults)


def expand(jobs: list[Job], base_seeds: dict[str, int]) -> list[WorkItem]:
    """One work item per image. base_seeds gives each job's resolved seed (needed where the job says -1)."""
    items = []
    for job in jobs:
        base = job.inputs["seed"] if job.inputs["seed"] != -1 else base_seeds[job.id]
        width, height = presets.dimensions(job.inputs["aspect_ratio"], job.inputs["image_size"])
        for v in range(job.variations):
            # fixed width, not sized to the count: raising `variations` later must not rename done items
            items.append(WorkItem(id=f"{job.id}_{v:03d}", job=job.id, line=job.line, variation=v,
                                  seed=base + v, inputs=job.inputs, width=width, height=height,
                                  fingerprint=job.fingerprint))
    return items
