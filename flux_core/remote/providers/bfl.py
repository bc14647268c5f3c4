"""Black Forest Labs' API, flux-dev: POST /v1/flux-dev with x-key, then poll the returned polling_url (it
can name a regional host) until Ready, Error or one of the moderation statuses.

BFL takes width and height (256..1440, multiples of 32) and guidance 1.5..5; the aspect ratio and
image_size are turned into such a size, and values outside its ranges are clamped and noted. There is
no speed setting and no cancel endpoint. Result links are signed and live ten minutes: the image is
downloaded at once, and a link that has already expired is replaced by polling again.
"""
from __future__ import annotations

import json
import logging
import os

from ..errors import InvalidRequest, MalformedReply, ModerationError, ResultExpired, TaskFailed
from ..request import OFF, Adjustments, RemoteRequest
from .base import Outcome, Progress, Provider, Task

log = logging.getLogger("flux_juiced.remote")

SIDE_RANGE = (256, 1440)
SIDE_MULTIPLE = 32
GUIDANCE_RANGE = (1.5, 5.0)
SAFETY_ENV = "FLUX_JUICED_BFL_SAFETY_TOLERANCE"
FORMATS = {"jpg": "jpeg", "png": "png", "webp": "webp"}
PENDING = {"Pending", "Queued", "Generating", "Reasoning", "Processing"}


def _round(value: float) -> int:
    return int(value / SIDE_MULTIPLE + 0.5) * SIDE_MULTIPLE


def bfl_size(request: RemoteRequest, adjust: Adjustments) -> tuple[int, int]:
    """(width, height) in BFL's limits that keep the aspect ratio, with the longest side image_size where
    the limits allow; any difference from the local size is noted."""
    low, high = SIDE_RANGE
    rw, rh = (int(x) for x in request.aspect_ratio.split(":"))
    longest = float(request.image_size)
    shortest = longest * min(rw, rh) / max(rw, rh)
    scale = min(1.0, high / longest)
    if shortest * scale < low:
        scale = low / shortest
    long_side = min(high, max(low, _round(longest * scale)))
    short_side = min(high, max(low, _round(shortest * scale)))
    width, height = (long_side, short_side) if rw >= rh else (short_side, long_side)
    local = request.size
    if (width, height) != local:
        why = (f"BFL's flux-dev makes sides of {low} to {high} px" if scale != 1.0
               else f"BFL's flux-dev takes sides in multiples of {SIDE_MULTIPLE}")
        adjust.note("size", f"{local[0]}x{local[1]}", f"{width}x{height}", why)
    return width, height


def safety_tolerance() -> int:
    raw = os.environ.get(SAFETY_ENV, "2")
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= 6:
        raise InvalidRequest(f"{SAFETY_ENV}={raw!r} must be 0 (strictest) to 6")
    return value


class BFL(Provider):
    name = "bfl"
    label = "Black Forest Labs API (flux-dev)"
    model = "flux-dev"
    base_env = "FLUX_JUICED_BFL_BASE_URL"
    default_base = "https://api.bfl.ai"
    trusted_hosts = ("bfl.ai", "bfl.ml")
    expiry_hint = "BFL's result links are signed for 10 minutes; run the job again for a new image"
    formats = FORMATS
    submit_path = "/v1/flux-dev"
    follow_polling_url = True  # BFL answers with the address of the cluster that holds the task

    def auth_headers(self) -> dict:
        return {"x-key": self.key}

    def poll_fallback(self, task_id: str) -> str:
        return f"{self.base}/v1/get_result?id={task_id}"

    def build_input(self, request: RemoteRequest, adjust: Adjustments) -> dict:
        width, height = bfl_size(request, adjust)
        if request.speed_mode != OFF:
            adjust.note("speed_mode", request.speed_mode, None,
                        f"{self.label} runs at one speed; it has no speed setting", refusable=False)
        output_format = self.formats.get(request.output_format)
        if output_format is None:
            output_format = "png"
            adjust.inform("output_format", request.output_format, f"{self.label} sends jpeg or png; png (lossless) is "
                                                                  f"fetched and the image is saved as asked")
        adjust.inform("output_quality", request.output_quality,
                      f"{self.label} has no quality setting; it applies when the pack saves the image")
        return {"prompt": request.prompt, "width": width, "height": height, "steps": request.num_inference_steps,
                "guidance": adjust.clamp("guidance", request.guidance, *GUIDANCE_RANGE, f"{self.label}"),
                "seed": request.seed, "safety_tolerance": safety_tolerance(), "output_format": output_format,
                "prompt_upsampling": False}

    def submit(self, payload: dict) -> Task:
        response = self.http.call("POST", self.base + self.submit_path, headers=self.headers(), json_body=payload,
                                  submit=True, label="submit")
        body = self.json(response, "submit")
        if not isinstance(body, dict) or not body.get("id"):
            raise MalformedReply(f"the submit answered without a task id: {json.dumps(body)[:200]}")
        task = Task(str(body["id"]), body)
        fallback = self.poll_fallback(task.id)
        polling = body.get("polling_url")
        if self.follow_polling_url and isinstance(polling, str) and polling:
            # The regional address is followed even on another host; the key goes only to BFL's own hosts.
            task.data["poll"] = polling if polling.startswith(("http://", "https://")) else fallback
        else:
            task.data["poll"] = self.same_host_or(polling, fallback)
        task.info.update({k: body[k] for k in ("cost", "input_mp", "output_mp") if k in body})
        return task

    def _poll_once(self, task: Task) -> dict:
        url = task.data["poll"]
        response = self.http.call("GET", url, headers=self.headers(url), label="poll")
        if response.status == 404:
            return {"status": "Task not found"}
        body = self.json(response, "poll")
        if not isinstance(body, dict) or not isinstance(body.get("status"), str):
            raise MalformedReply(f"a poll answered without a status: {json.dumps(body)[:200]}",
                                 hint="try again later")
        return body

    def wait(self, task: Task, progress: Progress) -> Outcome:
        not_found = 0
        seen_unknown = set()
        while True:
            body = self._poll_once(task)
            status = body["status"]
            if status == "Ready":
                return self._ready(task, body)
            details = body.get("details")
            said = f" ({json.dumps(details)[:300]})" if details else ""
            if status == "Request Moderated":
                raise ModerationError(f"the prompt was refused by moderation (Request Moderated){said}",
                                      hint=f"change the prompt; {SAFETY_ENV} (0 strictest to 6) sets the tolerance")
            if status == "Content Moderated":
                raise ModerationError(f"the generated image was refused by moderation (Content Moderated){said}",
                                      hint=f"try another seed or prompt, or raise {SAFETY_ENV} (0 strictest to 6)")
            if status in ("Error", "Failed"):
                raise TaskFailed(f"the job failed (status {status}){said}", hint="try again, or change the inputs")
            if status == "Task not found":
                not_found += 1
                if not_found > self.settings.not_found_grace:
                    raise ResultExpired("the provider does not know the task (Task not found): it has expired, or "
                                        "the polling address points at another cluster", hint=self.expiry_hint)
            else:
                not_found = 0
                if status not in PENDING and status not in seen_unknown:
                    seen_unknown.add(status)
                    log.info("FLUX.1 Juiced: %s task %s has status %r, read as still working", self.name, task.id,
                             status)
            fraction = body.get("progress")
            if isinstance(fraction, (int, float)) and not isinstance(fraction, bool):
                fraction = fraction / 100 if fraction > 1 else fraction
            else:
                fraction = None
            self.report(progress, fraction, status.lower())
            self.control.sleep(self.settings.poll_interval_s)

    def _ready(self, task: Task, body: dict) -> Outcome:
        result = body.get("result")
        sample = result.get("sample") if isinstance(result, dict) else None
        if not isinstance(sample, str) or not sample:
            raise MalformedReply(f"the task is Ready without a result link: {json.dumps(body)[:200]}",
                                 hint="try again")
        seed = result.get("seed")
        info = {k: result[k] for k in ("duration", "start_time", "end_time") if k in result}
        return Outcome(sample, seed if isinstance(seed, int) and not isinstance(seed, bool) else None, info)

    def refresh(self, task: Task) -> str | None:
        body = self._poll_once(task)
        if body.get("status") == "Ready" and isinstance(body.get("result"), dict):
            return body["result"].get("sample")
        return None

    def cancel(self, task: Task) -> bool:
        log.info("FLUX.1 Juiced: %s has no cancel; task %s runs out on its own (it may be billed)", self.name, task.id)
        return False
