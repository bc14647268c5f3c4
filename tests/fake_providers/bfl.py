"""Black Forest Labs' API for flux-dev (x-key), and CometAPI's BFL route (Bearer) built on it.

Switches: outcome "ready" | "request_moderated" | "content_moderated" | "error" | "not_found" |
"not_found_404" | "missing_status"; pending_status (e.g. "Generating", an unknown value meaning pending);
regional (the polling_url names another host: http://localhost:PORT); link_ttl (result links expire).
"""
from __future__ import annotations

import time

from .base import FakeProvider, Reply, make_image

FIELDS = {"prompt", "image_prompt", "width", "height", "steps", "prompt_upsampling", "seed", "guidance",
          "safety_tolerance", "output_format", "webhook_url", "webhook_secret"}


def validation_error(loc: str, msg: str):
    raise Reply(422, {"detail": [{"loc": ["body", loc], "msg": msg, "type": "value_error"}]})


class FakeBFL(FakeProvider):
    auth_header = "x-key"
    auth_prefix = ""
    submit_path = r"/v1/flux-dev"
    poll_path = r"/v1/get_result"
    formats = ("jpeg", "png", "webp")
    routes = [("POST", submit_path, "submit", "submit"), ("GET", poll_path, "poll", "poll")]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.outcome = "ready"
        self.pending_status = "Pending"
        self.regional = False
        self.poll_needs_auth = False  # the spec has no auth on get_result

    def needs_auth(self, route: str) -> bool:
        return route != "poll" or self.poll_needs_auth

    def unauthorized(self, req):
        raise Reply(403, {"detail": "Not Authenticated - Invalid Authentication"})

    def check(self, body: dict):
        for key in body:
            if key not in FIELDS:
                validation_error(key, "extra fields not permitted")
        for side in ("width", "height"):
            value = body.get(side, 1024)
            if not isinstance(value, int) or not 256 <= value <= 1440 or value % 32:
                validation_error(side, "must be a multiple of 32 from 256 to 1440")
        if not 1 <= body.get("steps", 28) <= 50:
            validation_error("steps", "must be 1..50")
        if not 1.5 <= body.get("guidance", 3) <= 5:
            validation_error("guidance", "must be 1.5..5")
        if not 0 <= body.get("safety_tolerance", 2) <= 6:
            validation_error("safety_tolerance", "must be 0..6")
        if body.get("output_format", "jpeg") not in self.formats:
            validation_error("output_format", f"must be one of {self.formats}")

    def poll_url(self, task_id: str) -> str:
        host = f"http://localhost:{self.port}" if self.regional else self.url
        return f"{host}{self.poll_path}?id={task_id}"

    def submit(self, req):
        body = req.json or {}
        self.check(body)
        job = {"id": self.new_id(), "input": body, "created": time.monotonic()}
        self.jobs[job["id"]] = job
        return {"id": job["id"], "polling_url": self.poll_url(job["id"]), "cost": 2.5, "input_mp": 0,
                "output_mp": round(body.get("width", 1024) * body.get("height", 768) / 1e6, 2)}

    def poll(self, req):
        job = self.jobs.get(req.query.get("id"))
        outcome = self.outcome
        if job is None or outcome == "not_found":
            return {"id": req.query.get("id"), "status": "Task not found", "result": None}
        if outcome == "not_found_404":
            raise Reply(404, {"detail": "Task not found"})
        phase = self.phase(job)
        if phase != "done":
            return {"id": job["id"], "status": self.pending_status, "result": None,
                    "progress": round(self.fraction(job), 2), "details": None}
        if outcome == "missing_status":
            return {"id": job["id"], "result": None}
        if outcome != "ready":
            status = {"request_moderated": "Request Moderated", "content_moderated": "Content Moderated",
                      "error": "Error"}[outcome]
            return {"id": job["id"], "status": status, "result": None,
                    "details": {"Moderation Reasons": ["Derivative Works Filter"]} if "moderated" in outcome else None}
        fmt = job["input"].get("output_format", "jpeg")
        url = self.publish(make_image(job["input"]["width"], job["input"]["height"], fmt), f"image/{fmt}", fmt)
        return {"id": job["id"], "status": "Ready", "progress": 1.0,
                "result": {"sample": url, "prompt": job["input"]["prompt"], "seed": job["input"].get("seed", 1),
                           "start_time": 1.0, "end_time": 2.0, "duration": 1.0}}


class FakeCometAPI(FakeBFL):
    auth_header = "authorization"
    auth_prefix = "Bearer "
    submit_path = r"/flux/v1/flux-dev"
    poll_path = r"/flux/v1/get_result"
    formats = ("jpeg", "png")
    routes = [("POST", submit_path, "submit", "submit"), ("GET", poll_path, "poll", "poll")]

    def needs_auth(self, route: str) -> bool:
        return True

    def unauthorized(self, req):
        raise Reply(401, {"error": {"message": "invalid token (request id: 2026112200000001)",
                                    "type": "comet_api_error", "param": "", "code": ""}})

    def not_found(self, req):
        # A wrong path answers a redirect to the web site, not a JSON 404.
        raise Reply(301, "<html><body>Moved</body></html>", headers={"Location": "https://www.cometapi.com/"},
                    content_type="text/html")

    def submit(self, req):
        body = dict(super().submit(req))
        body.pop("cost"), body.pop("input_mp"), body.pop("output_mp")
        return body
