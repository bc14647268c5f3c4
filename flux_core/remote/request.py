"""The job as the user asked for it (the design table's inputs, checked), and the record of every value a
provider could not take as asked: clamped and noted, or refused in strict mode. Never silently changed."""
from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field

from .. import presets
# The speed modes as the widget and the pruna app spell them; the engine's presets import without torch.
from ..speed.presets import BLINK, EXTRA_JUICED, JUICED, LIGHTLY_JUICED, OFF, SPEED_MODES  # noqa: F401
from ..speed.presets import resolve as _resolve_mode
from .errors import InvalidRequest

RANDOM_SEED_BITS = 32  # seeds every provider takes


def speed_mode_name(value: str) -> str:
    """The widget name of a speed mode given by name or alias, or OFF (the CLI's exact reference: no
    provider-side acceleration)."""
    if not isinstance(value, str):
        raise InvalidRequest(f"speed_mode must be one of {', '.join(SPEED_MODES)} or {OFF!r}; got {value!r}")
    try:
        mode = _resolve_mode(value)
    except ValueError as error:
        raise InvalidRequest(str(error)) from None
    return OFF if mode is None else mode.name


@dataclass
class RemoteRequest:
    prompt: str
    aspect_ratio: str = presets.DEFAULT_ASPECT_RATIO
    speed_mode: str = EXTRA_JUICED
    num_inference_steps: int = presets.DEFAULT_STEPS
    guidance: float = presets.DEFAULT_GUIDANCE
    seed: int = -1
    image_size: int = presets.DEFAULT_IMAGE_SIZE
    output_format: str = presets.DEFAULT_OUTPUT_FORMAT
    output_quality: int = presets.DEFAULT_OUTPUT_QUALITY

    def checked(self) -> "RemoteRequest":
        """A copy with the values validated against the design table and a random seed drawn for -1 (the
        seed is always sent, so the seed used is known whatever the provider reports)."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InvalidRequest("prompt is empty: describe the image to generate")
        try:
            presets.check_choice("aspect_ratio", self.aspect_ratio, presets.ASPECT_RATIOS)
            presets.check_range("num_inference_steps", self.num_inference_steps, presets.STEPS_RANGE)
            presets.check_range("guidance", self.guidance, presets.GUIDANCE_RANGE)
            presets.check_range("image_size", self.image_size, presets.IMAGE_SIZE_RANGE)
            presets.check_choice("output_format", self.output_format, presets.OUTPUT_FORMATS)
            presets.check_range("output_quality", self.output_quality, presets.QUALITY_RANGE)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        seed = self.seed
        if seed == -1:
            seed = secrets.randbits(RANDOM_SEED_BITS)
        elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= presets.SEED_MAX:
            raise InvalidRequest(f"seed must be -1 (random) or an integer from 0 to {presets.SEED_MAX}; got {seed!r}")
        return RemoteRequest(self.prompt, self.aspect_ratio, speed_mode_name(self.speed_mode),
                             int(self.num_inference_steps), float(self.guidance), seed, int(self.image_size),
                             self.output_format, int(self.output_quality))

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) the local path would make: longest side image_size, multiples of 16."""
        return presets.dimensions(self.aspect_ratio, self.image_size)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Adjustments:
    """What the provider gets differently from what was asked, each with the reason."""
    provider: str
    strict: bool = False
    items: list = field(default_factory=list)

    def note(self, name: str, asked, sent, why: str, refusable: bool = True) -> None:
        """Record a change; in strict mode refuse it instead. Speed modes are mapped to the provider's nearest
        level and noted, never refused (refusable=False): they trade time, not what the image is."""
        if self.strict and refusable:
            raise InvalidRequest(f"{name}={asked!r} cannot be honoured: {why}", provider=self.provider,
                                 hint="change the value, or unset FLUX_JUICED_REMOTE_STRICT to let the pack clamp it")
        self.items.append({"input": name, "asked": asked, "sent": sent, "why": why})

    def inform(self, name: str, asked, why: str) -> None:
        """Record an input the provider has no field for; it changes nothing the pack could send (never refused)."""
        self.items.append({"input": name, "asked": asked, "sent": None, "why": why})

    def clamp(self, name: str, value, low, high, why: str):
        clamped = min(max(value, low), high)
        if clamped != value:
            self.note(name, value, clamped, f"{why} accepts {low} to {high}")
        return clamped

    def lines(self) -> list[str]:
        return [f"{item['input']}: {item['asked']!r} -> {item['sent']!r} ({item['why']})" if item["sent"] is not None
                else f"{item['input']}: {item['asked']!r} not used ({item['why']})" for item in self.items]
