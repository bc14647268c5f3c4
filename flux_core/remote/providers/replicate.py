"""Replicate predictions, black-forest-labs/flux-dev (official model route, no version needed): create, poll
GET /v1/predictions/{id} until succeeded, failed, canceled or aborted, cancel with POST .../cancel.

The model takes the design table's aspect ratios, steps, guidance, seed, formats and quality as they are.
Its size is set in megapixels (1 or 0.25), not by the longest side, and its one speed-up is go_fast
(fp8): both mappings are noted. Outputs are deleted an hour after the prediction, so the image is
downloaded at once. Cancel-After asks Replicate to drop the job once the deadline has passed.
"""
from __future__ import annotations

import json
import logging
import math
import re

from ..errors import MalformedReply, ModerationError, ResultExpired, TaskCancelled, TaskFailed
from ..request import BLINK, EXTRA_JUICED, JUICED, LIGHTLY_JUICED, OFF, Adjustments, RemoteRequest
from .base import Outcome, Progress, Provider, Task, steps_progress
from .inference_sh import MODERATION

log = logging.getLogger("flux_juiced.remote")

MODEL = "black-forest-labs/flux-dev"
GO_FAST = {OFF: False, LIGHTLY_JUICED: False, JUICED: True, EXTRA_JUICED: True, BLINK: True}
_SEED_LOG = re.compile(r"[Uu]sing seed:?\s*(\d+)")


def cancel_after(seconds: float) -> str:
    """A duration string for the Cancel-After header: 9m30s, 45s."""
    seconds = max(5, math.ceil(seconds))
    minutes, rest = divmod(seconds, 60)
    return (f"{minutes}m" if minutes else "") + (f"{rest}s" if rest or not minutes else "")


def megapixels(request: RemoteRequest, adjust: Adjustments) -> str:
    """"1" or "0.25": the nearest of Replicate's two sizes; noted when the image comes out another size."""
    value = "1" if request.image_size > 724 else "0.25"  # 724 ~ the geometric middle of 512 and 1024
    rw, rh = (int(x) for x in request.aspect_ratio.split(":"))
    pixels = float(value) * 1024 * 1024
    width, height = math.sqrt(pixels * rw / rh), math.sqrt(pixels * rh / rw)
    if abs(max(width, height) - request.image_size) > 0.05 * request.image_size:
        adjust.note("image_size", request.image_size, f"megapixels={value} (about {width:.0f}x{height:.0f})",
                    "Replicate sizes flux-dev by megapixels, 1 or 0.25, not by the longest side")
    return value


class Replicate(Provider):
    name = "replicate"
    label = "Replicate (black-forest-labs/flux-dev)"
    model = MODEL
    base_env = "FLUX_JUICED_REPLICATE_BASE_URL"
    default_base = "https://api.replicate.com"
    trusted_hosts = ("replicate.com",)
    expiry_hint = "Replicate deletes API outputs an hour after the prediction; run the job again"

    def auth_headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"}

    def build_input(self, request: RemoteRequest, adjust: Adjustments) -> dict:
        go_fast = GO_FAST[request.speed_mode]
        if request.speed_mode != OFF:
            adjust.note("speed_mode", request.speed_mode, f"go_fast={str(go_fast).lower()}",
                        "Replicate has one speed-up, go_fast (fp8, not deterministic): on or off", refusable=False)
        return {"input": {
            "prompt": request.prompt, "aspect_ratio": request.aspect_ratio,
            "megapixels": megapixels(request, adjust), "num_outputs": 1,
            "num_inference_steps": request.num_inference_steps, "guidance": request.guidance, "seed": request.seed,
            "output_format": request.output_format, "output_quality": request.output_quality, "go_fast": go_fast,
            "disable_safety_checker": False}}

    def _prediction_url(self, task: Task) -> str:
        return f"{self.base}/v1/predictions/{task.id}"

    def submit(self, payload: dict) -> Task:
        headers = self.headers(**{"Cancel-After": cancel_after(self.control.remaining())})
        response = self.http.call("POST", f"{self.base}/v1/models/{MODEL}/predictions", headers=headers,
                                  json_body=payload, submit=True, label="submit")
        body = self.json(response, "submit")
        if not isinstance(body, dict) or not body.get("id"):
            raise MalformedReply(f"the submit answered without a prediction id: {json.dumps(body)[:200]}")
        return Task(str(body["id"]), body)

    def _get(self, task: Task) -> dict:
        url = self._prediction_url(task)
        body = self.json(self.http.call("GET", url, headers=self.headers(url), label="poll"), "poll")
        if not isinstance(body, dict) or not isinstance(body.get("status"), str):
            raise MalformedReply(f"a poll answered without a status: {json.dumps(body)[:200]}", hint="try again later")
        task.data = body
        return body

    def wait(self, task: Task, progress: Progress) -> Outcome:
        body = task.data
        unknown = set()
        while True:
            status = body.get("status")
            if status == "succeeded":
                return self._succeeded(task, body)
            if status == "failed":
                error = str(body.get("error") or "no reason given")
                if MODERATION.search(error):
                    raise ModerationError(f"the image was refused by the safety checker: {error}",
                                          hint="change the prompt or the seed")
                raise TaskFailed(f"the prediction failed: {error}", hint="try again, or change the inputs")
            if status == "canceled":
                raise TaskCancelled("the prediction was cancelled at the provider", hint="run it again")
            if status == "aborted":
                raise TaskFailed("the prediction was aborted: its deadline passed before it started (not billed)",
                                 hint="try again later, or raise FLUX_JUICED_REMOTE_DEADLINE_S")
            if status not in ("starting", "processing", None):
                if body.get("completed_at"):
                    raise TaskFailed(f"the prediction ended with an unknown status {status!r}: {body.get('error')}",
                                     hint="try again")
                if status not in unknown:
                    unknown.add(status)
                    log.info("FLUX.1 Juiced: replicate prediction %s has status %r, read as still working",
                             task.id, status)
            self.report(progress, steps_progress(body.get("logs")), str(status))
            self.control.sleep(self.settings.poll_interval_s)
            body = self._get(task)

    def _succeeded(self, task: Task, body: dict) -> Outcome:
        if body.get("data_removed"):
            raise ResultExpired("the prediction's output has been deleted (data_removed)", hint=self.expiry_hint)
        output = body.get("output")
        url = output[0] if isinstance(output, list) and output else output
        if not isinstance(url, str) or not url:
            raise MalformedReply(f"the prediction succeeded without an output link: {json.dumps(output)[:200]}",
                                 hint="try again")
        match = _SEED_LOG.search(str(body.get("logs") or ""))
        info = {"metrics": body["metrics"]} if body.get("metrics") else {}
        return Outcome(url, int(match.group(1)) if match else None, info)

    def refresh(self, task: Task) -> str | None:
        body = self._get(task)
        if body.get("status") != "succeeded" or body.get("data_removed"):
            return None
        output = body.get("output")
        return output[0] if isinstance(output, list) and output else output

    def cancel(self, task: Task) -> bool:
        url = self._prediction_url(task) + "/cancel"
        response = self.side_transport().call("POST", url, headers=self.headers(url), label="cancel")
        return response.ok
