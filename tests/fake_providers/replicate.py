"""Replicate's predictions API for black-forest-labs/flux-dev: 201 on create, starting -> processing ->
succeeded | failed | canceled | aborted, outputs as a list of links that vanish after an hour (link_ttl).

Switches: outcome "succeeded" | "nsfw" | "failed" | "aborted" | "unknown_final"; pending_status (an
unknown value that is not final); hold; data_removed.
"""
from __future__ import annotations

import time

from .base import FakeProvider, Reply, make_image

ASPECT_RATIOS = ["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"]
FIELDS = {"prompt", "aspect_ratio", "image", "prompt_strength", "num_outputs", "num_inference_steps", "guidance",
          "seed", "output_format", "output_quality", "disable_safety_checker", "go_fast", "megapixels"}
SIZES = {("1", "1:1"): (1024, 1024), ("1", "16:9"): (1344, 768), ("0.25", "1:1"): (512, 512)}


def invalid(detail: str):
    raise Reply(422, {"type": "https://replicate.com/docs/errors", "title": "Input validation failed", "status": 422,
                      "detail": detail}, content_type="application/problem+json")


class FakeReplicate(FakeProvider):
    routes = [
        ("POST", r"/v1/models/black-forest-labs/flux-dev/predictions", "submit", "create"),
        ("GET", r"/v1/predictions/([^/]+)", "poll", "get"),
        ("POST", r"/v1/predictions/([^/]+)/cancel", "cancel", "cancel"),
    ]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.outcome = "succeeded"
        self.pending_status = "processing"
        self.data_removed = False

    def unauthorized(self, req):
        raise Reply(401, {"title": "Unauthenticated", "detail": "You did not pass a valid authentication token",
                          "status": 401}, content_type="application/problem+json")

    def expired_file(self, req):
        raise Reply(404, "Not Found", content_type="text/plain")

    def create(self, req):
        body = req.json or {}
        data = body.get("input")
        if set(body) - {"input", "webhook", "webhook_events_filter", "stream"} or not isinstance(data, dict):
            invalid("the body must be {input: {...}}")
        extra = set(data) - FIELDS
        if extra:
            invalid(f"unknown inputs {sorted(extra)}")
        if data.get("aspect_ratio") not in ASPECT_RATIOS:
            invalid("aspect_ratio: not one of the allowed values")
        if data.get("output_format") not in ("webp", "jpg", "png"):
            invalid("output_format: not one of webp, jpg, png")
        if data.get("megapixels") not in ("1", "0.25"):
            invalid("megapixels: not one of 1, 0.25")
        if not 0 <= data.get("guidance", 3) <= 10 or not 1 <= data.get("num_inference_steps", 28) <= 50:
            invalid("guidance 0..10, num_inference_steps 1..50")
        if not 0 <= data.get("output_quality", 80) <= 100:
            invalid("output_quality 0..100")
        job = {"id": self.new_id(), "input": data, "created": time.monotonic(),
               "cancel_after": req.headers.get("cancel-after")}
        self.jobs[job["id"]] = job
        raise Reply(201, self.prediction(job))

    def prediction(self, job: dict) -> dict:
        phase = self.phase(job)
        data = job["input"]
        steps = data.get("num_inference_steps", 28)
        done = int(self.fraction(job) * steps)
        logs = f"Using seed: {data.get('seed', 0)}\n{int(100 * done / steps)}%|###| {done}/{steps}"
        url = f"{self.url}/v1/predictions/{job['id']}"
        body = {"id": job["id"], "model": "black-forest-labs/flux-dev", "version": "hidden", "input": data,
                "logs": "", "output": None, "data_removed": False, "error": None, "source": "api",
                "status": "starting", "created_at": "2026-11-22T00:00:00Z", "started_at": None,
                "completed_at": None, "urls": {"get": url, "cancel": url + "/cancel"}}
        if phase == "cancelled":
            return dict(body, status="canceled", completed_at="2026-11-22T00:00:02Z")
        if phase == "queued":
            return body
        if phase == "running":
            return dict(body, status=self.pending_status, logs=logs)
        final = dict(body, logs=logs, completed_at="2026-11-22T00:00:02Z")
        if self.outcome == "succeeded":
            if "url" not in job:
                fmt = data["output_format"]
                width, height = SIZES.get((data["megapixels"], data["aspect_ratio"]), (512, 512))
                job["url"] = self.publish(make_image(width // 8, height // 8, fmt),
                                          f"image/{'jpeg' if fmt == 'jpg' else fmt}", fmt)
            return dict(final, status="succeeded", output=None if self.data_removed else [job["url"]],
                        data_removed=self.data_removed, metrics={"predict_time": 1.5})
        if self.outcome == "nsfw":
            return dict(final, status="failed", error="NSFW content detected. Try running it again, or try a "
                                                      "different prompt.")
        if self.outcome == "failed":
            return dict(final, status="failed", error="CUDA error: device-side assert triggered")
        if self.outcome == "aborted":
            return dict(final, status="aborted")
        return dict(final, status="expired_somehow")

    def get(self, req, prediction_id):
        job = self.jobs.get(prediction_id)
        if job is None:
            raise Reply(404, {"title": "Not found", "detail": "Prediction not found", "status": 404},
                        content_type="application/problem+json")
        return self.prediction(job)

    def cancel(self, req, prediction_id):
        job = self.jobs.get(prediction_id)
        if job is None:
            raise Reply(404, {"detail": "Not found"})
        job["cancelled"] = True
        return self.prediction(job)
