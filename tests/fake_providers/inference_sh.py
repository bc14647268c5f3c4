"""inference.sh as the pruna/flux-dev app sees it: POST /apps/run, GET /tasks/{id}[/status|/stream],
POST /tasks/{id}/cancel, Bearer keys, three envelopes, two status numberings or names, NDJSON or SSE.

Switches (attributes): numbering "current" | "legacy" | "names"; envelope "v3" | "v1" | "bare";
stream_mode "ndjson" | "sse" | "heartbeats_only" | "close_early" | "unsupported"; outcome "completed" |
"failed" | "moderated" | "rejected"; image_as "object" | "string"; hold (runs until cancelled).
"""
from __future__ import annotations

import time

from .base import FakeProvider, Reply, _Stream, make_image

SPEED_MODES = ["Lightly Juiced 🍊 (more consistent)", "Juiced 🔥 (default)", "Extra Juiced 🔥 (more speed)",
               "Blink of an eye 👁️"]
ASPECT_RATIOS = ["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"]
NUMBERS = {
    "current": {"received": 1, "queued": 2, "running": 7, "uploading": 9, "completed": 10, "failed": 11,
                "cancelled": 12, "rejected": 13},
    "legacy": {"received": 1, "queued": 2, "running": 7, "uploading": 8, "completed": 9, "failed": 10,
               "cancelled": 11},
}


def check_input(data) -> list[str]:
    """The app's input schema (as researched; unknown fields are refused to catch mapping mistakes)."""
    if not isinstance(data, dict):
        return ["input must be an object"]
    problems = []
    allowed = {"prompt", "aspect_ratio", "speed_mode", "num_inference_steps", "guidance", "seed", "image_size",
               "output_format", "output_quality"}
    problems += [f"unknown field {k}" for k in data if k not in allowed]
    if not isinstance(data.get("prompt"), str) or not data["prompt"]:
        problems.append("prompt is required")
    if data.get("aspect_ratio") not in ASPECT_RATIOS:
        problems.append(f"aspect_ratio {data.get('aspect_ratio')!r} not allowed")
    if data.get("speed_mode") not in SPEED_MODES:
        problems.append(f"speed_mode {data.get('speed_mode')!r} not allowed")
    if not isinstance(data.get("num_inference_steps"), int) or not 1 <= data["num_inference_steps"] <= 50:
        problems.append("num_inference_steps must be 1..50")
    if not isinstance(data.get("guidance"), (int, float)) or not 0 <= data["guidance"] <= 10:
        problems.append("guidance must be 0..10")
    if data.get("output_format") not in ("jpg", "png", "webp"):
        problems.append("output_format must be jpg, png or webp")
    if not isinstance(data.get("output_quality"), int) or not 1 <= data["output_quality"] <= 100:
        problems.append("output_quality must be 1..100")
    if not isinstance(data.get("seed"), int):
        problems.append("seed must be an integer")
    return problems


class FakeInferenceSh(FakeProvider):
    routes = [
        ("POST", r"/apps/run", "submit", "run"),
        ("GET", r"/tasks/([^/]+)", "get", "get_task"),
        ("GET", r"/tasks/([^/]+)/status", "status", "get_status"),
        ("GET", r"/tasks/([^/]+)/stream", "stream", "stream"),
        ("POST", r"/tasks/([^/]+)/cancel", "cancel", "cancel"),
    ]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.numbering = "current"
        self.envelope = "v3"
        self.stream_mode = "ndjson"
        self.outcome = "completed"
        self.image_as = "object"
        self.heartbeat_s = 0.02
        self.app = "pruna/flux-dev"

    def unauthorized(self, req):
        raise Reply(401, {"type": "https://api.inference.sh/errors/unauthorized", "title": "Unauthorized",
                          "status": 401, "detail": "Invalid or missing API key"},
                    content_type="application/problem+json")

    def wrap(self, dto: dict):
        if self.envelope == "v1":
            return {"success": True, "status": 200, "data": dto}
        if self.envelope == "bare":
            return dto
        return {"data": dto, "messages": []}

    # --- the task as it stands now --------------------------------------------------------------------------
    def state(self, job: dict) -> str:
        phase = self.phase(job)
        if phase == "cancelled":
            return "cancelled"
        if phase == "queued":
            return "queued"
        if phase == "running":
            return "running" if self.fraction(job) < 0.8 or self.hold else "uploading"
        return {"completed": "completed", "failed": "failed", "moderated": "failed",
                "rejected": "rejected"}[self.outcome]

    def code(self, name: str):
        if self.numbering == "names":
            return name
        return NUMBERS[self.numbering][name]

    def task(self, job: dict) -> dict:
        name = self.state(job)
        steps = job["input"]["num_inference_steps"]
        done = int(self.fraction(job) * steps)
        dto = {"id": job["id"], "status": self.code(name), "input": job["input"], "output": None, "error": None,
               "created_at": "2026-11-22T00:00:00Z", "updated_at": "2026-11-22T00:00:01Z",
               "logs": [{"id": "l1", "log_type": "stdout", "content": f"{done}/{steps} steps"}] if name != "queued"
               else []}
        if name == "completed":
            if "url" not in job:
                fmt = job["input"]["output_format"]
                data = make_image(64, 64, fmt)
                job["url"] = self.publish(data, f"image/{'jpeg' if fmt == 'jpg' else fmt}", fmt)
            image = job["url"] if self.image_as == "string" else {"uri": job["url"], "content_type": "image/png"}
            dto["output"] = {"image": image, "output_meta": {"outputs": [{"type": "image", "width": 64, "height": 64,
                                                                          "steps": steps, "count": 1}]}}
        elif name == "failed":
            dto["error"] = ("NSFW content detected by the safety filter" if self.outcome == "moderated"
                            else "CUDA out of memory")
        elif name == "rejected":
            dto["error"] = "insufficient balance"
        return dto

    def _job(self, task_id: str) -> dict:
        job = self.jobs.get(task_id)
        if job is None:
            raise Reply(404, {"type": "https://api.inference.sh/errors/not_found", "title": "Not Found",
                              "status": 404, "detail": "task not found"}, content_type="application/problem+json")
        return job

    # --- routes ------------------------------------------------------------------------------------------------
    def run(self, req):
        body = req.json or {}
        problems = check_input(body.get("input"))
        if body.get("app") != self.app:
            problems.append(f"unknown app {body.get('app')!r}")
        if problems:
            raise Reply(422, {"type": "https://api.inference.sh/errors/validation_error", "title": "Validation",
                              "status": 422, "detail": "; ".join(problems)}, content_type="application/problem+json")
        job = {"id": self.new_id(), "input": body["input"], "created": time.monotonic()}
        self.jobs[job["id"]] = job
        return self.wrap(dict(self.task(job), status=self.code("received")))

    def get_task(self, req, task_id):
        return self.wrap(self.task(self._job(task_id)))

    def get_status(self, req, task_id):
        dto = self.task(self._job(task_id))
        return self.wrap({"id": dto["id"], "status": dto["status"], "updated_at": dto["updated_at"]})

    def cancel(self, req, task_id):
        job = self._job(task_id)
        if self.state(job) in ("completed", "failed", "rejected"):
            raise Reply(409, {"type": "https://api.inference.sh/errors/invalid_transition", "title": "Conflict",
                              "status": 409, "detail": "the task already moved on"},
                        content_type="application/problem+json")
        job["cancelled"] = True
        raise Reply(204)

    def stream(self, req, task_id):
        job = self._job(task_id)
        mode = self.stream_mode
        if mode == "unsupported":
            raise Reply(404, {"detail": "Not Found"})
        sse = mode == "sse" or "text/event-stream" in req.headers.get("accept", "")

        def frame(obj) -> str:
            import json

            text = json.dumps(obj)
            return f"event: update\ndata: {text}\n\n" if sse else text + "\n"

        def lines():
            last = None
            started = time.monotonic()
            while True:
                yield frame({"type": "heartbeat"}) if not sse else ": heartbeat\n\n"
                if mode == "heartbeats_only":
                    time.sleep(self.heartbeat_s)
                    if time.monotonic() - started > 30:
                        return
                    continue
                dto = self.task(job)
                if dto["status"] != last:
                    last = dto["status"]
                    if mode == "close_early" and self.state(job) == "running":
                        return  # the stream ends without a terminal event
                    name = self.state(job)
                    if name in ("completed", "failed", "cancelled", "rejected"):
                        yield frame(dto)  # a final full task, then the end
                        return
                    yield frame({"data": {"id": dto["id"], "status": dto["status"], "logs": dto["logs"]},
                                 "fields": ["status", "logs"]})
                time.sleep(self.heartbeat_s)

        raise _Stream(lines(), "text/event-stream" if sse else "application/x-ndjson")
