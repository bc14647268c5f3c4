"""fal.ai queue API, fal-ai/flux/dev: submit to /fal-ai/flux/dev, then follow the status, result and cancel
addresses the submit returns (they drop the /dev subpath). Status answers 202 while queued or running and
200 once completed; a completed request may still carry an error. Images flagged by the safety checker
(has_nsfw_concepts) become a moderation error, never a black image.
"""
from __future__ import annotations

import json

from ..errors import MalformedReply, ModerationError, TaskCancelled, TaskFailed
from ..request import BLINK, EXTRA_JUICED, JUICED, LIGHTLY_JUICED, OFF, Adjustments, RemoteRequest
from .base import Outcome, Progress, Provider, Task, error_detail, steps_progress

APP = "fal-ai/flux"          # status, result and cancel live under the app
ENDPOINT = "fal-ai/flux/dev"  # submit goes to the endpoint
GUIDANCE_RANGE = (1.0, 20.0)
# speed mode -> fal's acceleration level (none | regular | high): four modes onto three levels.
ACCELERATION = {OFF: "none", LIGHTLY_JUICED: "none", JUICED: "regular", EXTRA_JUICED: "high", BLINK: "high"}
FORMATS = {"jpg": "jpeg", "png": "png"}


class Fal(Provider):
    name = "fal"
    label = "fal.ai (fal-ai/flux/dev)"
    model = ENDPOINT
    base_env = "FLUX_JUICED_FAL_BASE_URL"
    default_base = "https://queue.fal.run"
    trusted_hosts = ("fal.run", "falrun.com")
    expiry_hint = "fal keeps results for a limited time; run the job again"

    def auth_headers(self) -> dict:
        return {"Authorization": f"Key {self.key}"}

    def build_input(self, request: RemoteRequest, adjust: Adjustments) -> dict:
        width, height = request.size
        acceleration = ACCELERATION[request.speed_mode]
        if request.speed_mode == LIGHTLY_JUICED:
            adjust.note("speed_mode", request.speed_mode, "acceleration=none",
                        "fal has no mild acceleration level (none, regular, high); none is the most consistent",
                        refusable=False)
        elif request.speed_mode == BLINK:
            adjust.note("speed_mode", request.speed_mode, "acceleration=high", "high is fal's fastest level",
                        refusable=False)
        output_format = FORMATS.get(request.output_format)
        if output_format is None:
            output_format = "png"
            adjust.inform("output_format", request.output_format,
                          "fal sends jpeg or png; png (lossless) is fetched and the image is saved as asked")
        adjust.inform("output_quality", request.output_quality,
                      "fal has no quality setting; it applies when the pack saves the image")
        return {"prompt": request.prompt, "image_size": {"width": width, "height": height},
                "num_inference_steps": request.num_inference_steps,
                "guidance_scale": adjust.clamp("guidance", request.guidance, *GUIDANCE_RANGE, "fal's guidance_scale"),
                "seed": request.seed, "num_images": 1, "enable_safety_checker": True,
                "output_format": output_format, "sync_mode": False, "acceleration": acceleration}

    def _urls(self, task: Task) -> dict:
        own = f"{self.base}/{APP}/requests/{task.id}"
        body = task.data
        return {"status": self.same_host_or(body.get("status_url"), own + "/status"),
                "result": self.same_host_or(body.get("response_url"), own),
                "cancel": self.same_host_or(body.get("cancel_url"), own + "/cancel")}

    def submit(self, payload: dict) -> Task:
        # The start timeout: fal drops the request if it has not started within the time we will wait.
        start_timeout = max(2, int(self.control.remaining()))
        response = self.http.call("POST", f"{self.base}/{ENDPOINT}", headers=self.headers(
            **{"X-Fal-Request-Timeout": str(start_timeout)}), json_body=payload, submit=True, label="submit")
        body = self.json(response, "submit")
        if not isinstance(body, dict) or not body.get("request_id"):
            raise MalformedReply(f"the submit answered without a request_id: {json.dumps(body)[:200]}")
        return Task(str(body["request_id"]), body)

    def wait(self, task: Task, progress: Progress) -> Outcome:
        urls = self._urls(task)
        status_url = urls["status"] + ("&" if "?" in urls["status"] else "?") + "logs=1"
        while True:
            response = self.http.call("GET", status_url, headers=self.headers(status_url), label="status")
            body = self.json(response, "status poll")
            status = body.get("status") if isinstance(body, dict) else None
            if not isinstance(status, str):
                raise MalformedReply(f"a status poll answered without a status: {json.dumps(body)[:200]}",
                                     hint="try again later")
            if status == "COMPLETED":
                if body.get("error"):
                    raise TaskFailed(f"the job failed: {body['error']} ({body.get('error_type') or 'no type'})",
                                     hint="try again, or change the inputs")
                task.info["metrics"] = body.get("metrics")
                return self._result(task, urls["result"])
            if status in ("FAILED", "ERROR"):
                raise TaskFailed(f"the job failed: {body.get('error') or status}", hint="try again")
            if status in ("CANCELED", "CANCELLED"):
                raise TaskCancelled("the job was cancelled at the provider", hint="run it again")
            logs = body.get("logs") or []
            text = " ".join(str(e.get("message", "")) if isinstance(e, dict) else str(e) for e in logs)
            where = f"in queue, position {body.get('queue_position')}" if status == "IN_QUEUE" else status.lower()
            self.report(progress, steps_progress(text), where)
            self.control.sleep(self.settings.poll_interval_s)

    def _result(self, task: Task, url: str) -> Outcome:
        response = self.http.call("GET", url, headers=self.headers(url), label="result")
        if not response.ok:
            if response.status in (400, 422, 500):
                raise TaskFailed(f"the job failed (HTTP {response.status}: {error_detail(response)})",
                                 hint="fix the input named above, or try again")
            self.raise_for(response, "result fetch")
        body = self.http.parse_json(response)
        images = body.get("images") if isinstance(body, dict) else None
        if not isinstance(images, list) or not images or not isinstance(images[0], dict):
            raise MalformedReply(f"the result has no images: {json.dumps(body)[:200]}", hint="try again")
        flags = body.get("has_nsfw_concepts") or []
        if isinstance(flags, list) and flags and flags[0] is True:
            raise ModerationError("the safety checker flagged the image (has_nsfw_concepts); fal returns a black image "
                                  "in that case, so none is returned", hint="change the prompt or the seed")
        seed = body.get("seed")
        info = {k: body[k] for k in ("timings",) if k in body}
        return Outcome(images[0].get("url"), seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
                       info)

    def cancel(self, task: Task) -> bool:
        url = self._urls(task)["cancel"]
        response = self.side_transport().call("PUT", url, headers=self.headers(url), label="cancel")
        return response.ok
