"""generate_remote: one FLUX.1 [dev] job at a hosted provider, from the design table's inputs to PIL images
and metadata. Submit once, wait (stream or poll) within the deadline, download at once, cancel at the
provider if the user cancels or the deadline passes."""
from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit, urlunsplit

from .. import presets
from .control import Control
from .errors import Interrupted, MalformedReply, MissingKey, RemoteError, RemoteTimeout
from .keys import get_key, redact_data, where_keys_go
from .providers import DEFAULT_PROVIDER, get_provider
from .request import EXTRA_JUICED, Adjustments, RemoteRequest
from .settings import RemoteSettings

log = logging.getLogger("flux_juiced.remote")


@dataclass
class RemoteResult:
    images: list                  # PIL RGB images (one per job)
    seed: int                     # the seed used
    metadata: dict                # provider, task id, what was asked and sent, adjustments, timings; never a key
    files: list = field(default_factory=list)  # (bytes, content type) as the provider sent them

    @property
    def image(self):
        return self.images[0]


def _public_address(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.hostname + (f":{parts.port}" if parts.port else ""), parts.path, "", ""))


def decode_image(data: bytes, content_type: str):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise MalformedReply(f"the result file ({content_type or 'no content type'}, {len(data)} bytes) is not a "
                             f"readable image: {exc}", hint="try again") from None
    return image.convert("RGB")


def generate_remote(prompt: str, provider: str = DEFAULT_PROVIDER, *,
                    aspect_ratio: str = presets.DEFAULT_ASPECT_RATIO, speed_mode: str = EXTRA_JUICED,
                    num_inference_steps: int = presets.DEFAULT_STEPS, guidance: float = presets.DEFAULT_GUIDANCE,
                    seed: int = -1, image_size: int = presets.DEFAULT_IMAGE_SIZE,
                    output_format: str = presets.DEFAULT_OUTPUT_FORMAT,
                    output_quality: int = presets.DEFAULT_OUTPUT_QUALITY, settings: RemoteSettings | None = None,
                    is_cancelled: Callable[[], bool] | None = None,
                    progress: Callable[[float | None, str], None] | None = None) -> RemoteResult:
    """Run one job at `provider` (inference.sh, bfl, fal, replicate or cometapi).

    is_cancelled is looked at while waiting; when it says yes the job is cancelled at the provider (where
    it can be) and Interrupted is raised. progress(fraction or None, status text) is called while waiting.
    Raises a RemoteError subclass naming the provider, the task id and what to do.
    """
    cls = get_provider(provider)
    request = RemoteRequest(prompt, aspect_ratio, speed_mode, num_inference_steps, guidance, seed, image_size,
                            output_format, output_quality).checked()
    settings = settings or RemoteSettings.from_env()
    key = get_key(cls.name)
    if not key:
        raise MissingKey(f"no API key for {cls.label}", provider=cls.name, hint=where_keys_go(cls.name))
    control = Control(settings.deadline_s, is_cancelled)
    client = cls(key, settings, control)
    adjust = Adjustments(cls.name, settings.strict)
    task = None
    timings = {}
    try:
        payload = client.build_input(request, adjust)
        for line in adjust.lines():
            log.info("FLUX.1 Juiced: %s: %s", cls.name, line)
        started = time.monotonic()
        task = client.submit(payload)
        timings["submit_s"] = round(time.monotonic() - started, 3)
        log.info("FLUX.1 Juiced: %s job %s submitted", cls.name, task.id)
        outcome = client.wait(task, progress or (lambda fraction, text: None))
        timings["wait_s"] = round(time.monotonic() - started - timings["submit_s"], 3)
        data, content_type = client.fetch(task, outcome.image_url)
        image = decode_image(data, content_type)
        timings["total_s"] = round(time.monotonic() - started, 3)
    except (Interrupted, RemoteTimeout) as exc:
        cancelled = client.best_effort_cancel(task)
        note = "; cancelled at the provider" if cancelled else (
            "; the provider has no cancel, the job runs out on its own" if task else "")
        exc.problem += note
        raise exc.with_context(cls.name, task.id if task else None) from None
    except RemoteError as exc:
        raise exc.with_context(cls.name, task.id if task else None) from None
    except KeyboardInterrupt:  # Ctrl-C in the CLI: do not leave a paid job running
        client.best_effort_cancel(task)
        raise
    used_seed = outcome.seed if outcome.seed is not None else request.seed
    if outcome.seed is not None and outcome.seed != request.seed:
        adjust.inform("seed", request.seed, f"the provider reports seed {outcome.seed}; that one is recorded")
    metadata = {
        "provider": cls.name, "provider_label": cls.label, "model": client.model, "task_id": task.id,
        "address": _public_address(client.base), "seed": used_seed, "width": image.width, "height": image.height,
        "requested": request.as_dict(), "sent": payload, "adjustments": adjust.items,
        "provider_info": {**task.info, **outcome.info}, "timings": timings,
        "http": {"calls": dict(client.http.stats.calls), "retries": client.http.stats.retries,
                 "waited_s": round(client.http.stats.waited_s, 3)},
    }
    log.info("FLUX.1 Juiced: %s job %s done in %.1f s (%dx%d, seed %s)", cls.name, task.id, timings["total_s"],
             image.width, image.height, used_seed)
    return RemoteResult([image], used_seed, redact_data(metadata), [(data, content_type)])
