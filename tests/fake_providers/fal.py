"""fal.ai's queue API for fal-ai/flux/dev: submit with the /dev subpath, status/result/cancel without it,
202 while queued or running, 200 once completed, `Authorization: Key ...`.

Switches: outcome "completed" | "nsfw" | "error"; hold; the generic faults (html = ingress 502 page).
"""
from __future__ import annotations

import time

from .base import FakeProvider, Reply, make_image

FIELDS = {"prompt", "image_size", "num_inference_steps", "seed", "guidance_scale", "num_images",
          "enable_safety_checker", "output_format", "sync_mode", "acceleration"}


def invalid(loc: str, msg: str):
    raise Reply(422, {"detail": [{"loc": ["body", loc], "msg": msg, "type": "value_error"}]})


class FakeFal(FakeProvider):
    auth_prefix = "Key "
    routes = [
        ("POST", r"/fal-ai/flux/dev", "submit", "submit"),
        ("GET", r"/fal-ai/flux/requests/([^/]+)/status", "status", "status"),
        ("GET", r"/fal-ai/flux/requests/([^/]+)", "result", "result"),
        ("PUT", r"/fal-ai/flux/requests/([^/]+)/cancel", "cancel", "cancel"),
    ]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.outcome = "completed"
        self.result_url = None  # replaces the image link in the result (e.g. a file: URL)

    def unauthorized(self, req):
        raise Reply(401, {"detail": "No user found for Key ID and Secret"})

    def submit(self, req):
        body = req.json or {}
        for key in body:
            if key not in FIELDS:
                invalid(key, "extra fields not permitted")
        size = body.get("image_size")
        if not (isinstance(size, str) or (isinstance(size, dict) and set(size) == {"width", "height"})):
            invalid("image_size", "a preset name or {width, height}")
        if not 1 <= body.get("num_inference_steps", 28) <= 50:
            invalid("num_inference_steps", "must be 1..50")
        if not 1 <= body.get("guidance_scale", 3.5) <= 20:
            invalid("guidance_scale", "must be 1..20")
        if body.get("output_format", "jpeg") not in ("jpeg", "png"):
            invalid("output_format", "must be jpeg or png")
        if body.get("acceleration", "none") not in ("none", "regular", "high"):
            invalid("acceleration", "must be none, regular or high")
        job = {"id": self.new_id(), "input": body, "created": time.monotonic(),
               "timeout": req.headers.get("x-fal-request-timeout")}
        self.jobs[job["id"]] = job
        base = f"{self.url}/fal-ai/flux/requests/{job['id']}"
        return {"request_id": job["id"], "response_url": base, "status_url": base + "/status",
                "cancel_url": base + "/cancel", "queue_position": 0}

    def _job(self, request_id):
        job = self.jobs.get(request_id)
        if job is None:
            raise Reply(404, {"detail": "Request not found"})
        return job

    def status(self, req, request_id):
        job = self._job(request_id)
        phase = self.phase(job)
        if phase == "queued":
            raise Reply(202, {"status": "IN_QUEUE", "queue_position": 0})
        if phase == "running":
            steps = job["input"].get("num_inference_steps", 28)
            done = int(self.fraction(job) * steps)
            raise Reply(202, {"status": "IN_PROGRESS", "logs": [{"message": f"{done}/{steps}", "level": "INFO"}]})
        if phase == "cancelled":
            return {"status": "COMPLETED", "error": "Request cancelled", "error_type": "cancelled"}
        body = {"status": "COMPLETED", "logs": None, "metrics": {"inference_time": 1.2}}
        if self.outcome == "error":
            body.update(error="Internal error while generating", error_type="runner_error")
        return body

    def result(self, req, request_id):
        job = self._job(request_id)
        if self.phase(job) != "done":
            raise Reply(400, {"detail": "Request is still in progress"})
        size = job["input"]["image_size"]
        fmt = job["input"].get("output_format", "jpeg")
        url = self.result_url or self.publish(make_image(size["width"], size["height"], fmt), f"image/{fmt}", fmt)
        return {"images": [{"url": url, "width": size["width"], "height": size["height"],
                            "content_type": f"image/{fmt}"}],
                "timings": {"inference": 1.22}, "seed": job["input"].get("seed", 1),
                "has_nsfw_concepts": [self.outcome == "nsfw"], "prompt": job["input"]["prompt"]}

    def cancel(self, req, request_id):
        job = self._job(request_id)
        if self.phase(job) == "done":
            raise Reply(400, {"status": "ALREADY_COMPLETED"})
        job["cancelled"] = True
        raise Reply(202, {"status": "CANCELLATION_REQUESTED"})
