"""inference.sh, app pruna/flux-dev: POST /apps/run, then the task's NDJSON stream (or polling), by status name.

The app takes the design table's inputs as they are, speed modes included (byte-exact labels, emoji and
all). Task statuses come as names or numbers, and the numbering changed in 2026 (a CANCELLING=8 was
inserted: COMPLETED moved from 9 to 10, FAILED from 10 to 11, CANCELLED from 11 to 12; REJECTED=13 was
added). A number is read with the task's content, so both schemes work; completion is confirmed by a GET.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time

from ..errors import (MalformedReply, ModerationError, PaymentRequired, ProviderUnavailable, TaskCancelled,
                      TaskFailed)
from ..request import LIGHTLY_JUICED, OFF, Adjustments, RemoteRequest
from .base import Outcome, Progress, Provider, Task, steps_progress

log = logging.getLogger("flux_juiced.remote")

APP_ENV = "FLUX_JUICED_INFERENCE_APP"
NUMBERING_ENV = "FLUX_JUICED_INFERENCE_STATUS_NUMBERING"   # auto | current | legacy
MODE_ENV = "FLUX_JUICED_INFERENCE_MODE"                    # stream | poll

CURRENT = {0: "unknown", 1: "received", 2: "queued", 3: "dispatched", 4: "preparing", 5: "serving",
           6: "setting_up", 7: "running", 8: "cancelling", 9: "uploading", 10: "completed", 11: "failed",
           12: "cancelled", 13: "rejected"}
LEGACY = {1: "received", 2: "queued", 3: "scheduled", 4: "preparing", 5: "serving", 6: "setting_up", 7: "running",
          8: "uploading", 9: "completed", 10: "failed", 11: "cancelled"}
TERMINAL = {"completed", "failed", "cancelled", "rejected"}
_SYNONYMS = {"canceled": "cancelled", "succeeded": "completed", "success": "completed", "error": "failed"}
MODERATION = re.compile(r"nsfw|moderat|safety|content polic|inappropriate", re.I)


def image_url(output) -> str | None:
    """output.image as a plain URL or a File object {"uri": ...} (or the first of output.images)."""
    if not isinstance(output, dict):
        return None
    image = output.get("image")
    if image is None and isinstance(output.get("images"), list) and output["images"]:
        image = output["images"][0]
    if isinstance(image, dict):
        image = image.get("uri") or image.get("url")
    return image if isinstance(image, str) and image else None


def status_name(task: dict, numbering: str = "auto") -> str:
    """The status of a task as a lowercase name, whatever form and numbering it came in."""
    value = task.get("status")
    if isinstance(value, str):
        text = value.strip().lower()
        if not text.isdigit():
            return _SYNONYMS.get(text, text)
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int):
        return "unknown"
    if numbering == "current":
        return CURRENT.get(value, "unknown")
    if numbering == "legacy":
        return LEGACY.get(value, "unknown")
    # Both schemes at once: 9, 10 and 11 mean different things, the task's content tells them apart.
    has_image = image_url(task.get("output")) is not None
    if value == 8:
        return "uploading" if has_image else "cancelling"  # not terminal in either scheme
    if value == 9:
        return "completed" if has_image else "uploading"
    if value == 10:
        return "completed" if has_image else "failed"
    if value == 11:
        return "failed" if task.get("error") else "cancelled"
    return CURRENT.get(value, "unknown")


def unwrap(body):
    """A task from any of the three envelopes: v1 {"success","data"}, v3 {"data","messages"}, or bare."""
    if isinstance(body, dict) and isinstance(body.get("data"), dict) and ("success" in body or "messages" in body
                                                                          or "id" in body["data"]):
        return body["data"]
    return body


class InferenceSh(Provider):
    name = "inference.sh"
    label = "inference.sh (pruna/flux-dev)"
    base_env = "FLUX_JUICED_INFERENCE_BASE_URL"
    default_base = "https://api.inference.sh"
    trusted_hosts = ("inference.sh",)
    expiry_hint = "output files are downloaded at once; if the link is gone, run the job again"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model = os.environ.get(APP_ENV) or "pruna/flux-dev"
        self.numbering = (os.environ.get(NUMBERING_ENV) or "auto").lower()
        self.mode = (os.environ.get(MODE_ENV) or "stream").lower()

    def auth_headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"}

    def build_input(self, request: RemoteRequest, adjust: Adjustments) -> dict:
        speed_mode = request.speed_mode
        if speed_mode == OFF:
            adjust.note("speed_mode", OFF, LIGHTLY_JUICED, "pruna/flux-dev has no unaccelerated mode; this is its most "
                                                           "consistent one", refusable=False)
            speed_mode = LIGHTLY_JUICED
        return {"app": self.model, "infra": "cloud", "input": {
            "prompt": request.prompt, "aspect_ratio": request.aspect_ratio, "speed_mode": speed_mode,
            "num_inference_steps": request.num_inference_steps, "guidance": request.guidance, "seed": request.seed,
            "image_size": request.image_size, "output_format": request.output_format,
            "output_quality": request.output_quality}}

    # --- calls ----------------------------------------------------------------------------------------
    def _task_url(self, task: Task, tail: str = "") -> str:
        return f"{self.base}/tasks/{task.id}{tail}"

    def _envelope(self, response, during: str) -> dict:
        body = self.json(response, during)
        if isinstance(body, dict) and body.get("success") is False:  # v1 error inside a 200
            error = body.get("error") or {}
            raise TaskFailed(f"the {during} failed: {error.get('message') or error.get('code') or body}")
        task = unwrap(body)
        if not isinstance(task, dict):
            raise MalformedReply(f"the {during} answered {type(task).__name__}, not a task object")
        return task

    def submit(self, payload: dict) -> Task:
        response = self.http.call("POST", f"{self.base}/apps/run", headers=self.headers(), json_body=payload,
                                  submit=True, label="submit")
        data = self._envelope(response, "submit")
        if not data.get("id"):
            raise MalformedReply(f"the submit answered without a task id: {json.dumps(data)[:200]}")
        return Task(str(data["id"]), data)

    def _get(self, task: Task) -> dict:
        response = self.http.call("GET", self._task_url(task), headers=self.headers(), label="get")
        task.data.update(self._envelope(response, "task lookup"))
        return task.data

    def _terminal(self, data: dict) -> bool:
        return status_name(data, self.numbering) in TERMINAL

    def wait(self, task: Task, progress: Progress) -> Outcome:
        if self._terminal(task.data):
            return self._finish(task, self._get(task))
        if self.mode == "stream":
            for _ in range(self.settings.stream_reconnects + 1):
                try:
                    ended = self._stream(task, progress)
                except ProviderUnavailable as exc:  # the stream could not start: the task may still be fine
                    log.info("FLUX.1 Juiced: inference.sh stream of %s failed to start: %s", task.id, exc.problem)
                    ended = "error"
                data = self._get(task)  # confirm a terminal event, or reconcile a stream that stopped early
                if self._terminal(data):
                    return self._finish(task, data)
                if ended == "unsupported":
                    break
                log.info("FLUX.1 Juiced: inference.sh stream of %s ended (%s) before the task did; reconnecting",
                         task.id, ended)
                self.control.sleep(min(1.0, self.settings.poll_interval_s))
            log.info("FLUX.1 Juiced: inference.sh task %s: polling instead of streaming", task.id)
        return self._poll(task, progress)

    def _stream(self, task: Task, progress: Progress) -> str:
        """Follow the NDJSON stream until a terminal update; returns why it stopped."""
        stream = self.http.open_stream(self._task_url(task, "/stream"),
                                       self.headers(Accept="application/x-ndjson"))
        if stream.status != 200:
            response = stream.error_body()
            if response.status in (401, 402, 403):
                self.raise_for(response, "stream")
            return "unsupported"
        last_news = time.monotonic()
        try:
            while True:
                self.control.check()
                kind, item = stream.next(0.05)
                if kind in ("eof", "error"):
                    return kind
                update = self._parse_line(item) if kind == "line" else None
                if update:
                    last_news = time.monotonic()
                    task.data.update(update)
                    self._progress(task.data, progress)
                    if self._terminal(task.data):
                        return "terminal"
                elif time.monotonic() - last_news > self.settings.stream_idle_s:
                    return "idle"  # heartbeats only: the server may never send the end
        finally:
            stream.close()

    @staticmethod
    def _parse_line(raw: bytes) -> dict | None:
        """A task update from one NDJSON line (or an SSE data line); None for heartbeats and noise."""
        line = raw.decode("utf-8", "replace").strip()
        if line.startswith("data:"):
            line = line[5:].strip()
        if not line or line.startswith((":", "event:", "id:", "retry:")):
            return None
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            log.warning("FLUX.1 Juiced: inference.sh sent a stream line that is not JSON; skipped")
            return None
        if not isinstance(obj, dict) or obj.get("type") == "heartbeat":
            return None
        if "event" in obj:  # typed events belong to chat streams
            return None
        if isinstance(obj.get("data"), dict):  # partial update {"data": {...}, "fields": [...]}
            return obj["data"]
        return obj if ("status" in obj or "output" in obj) else None

    def _poll(self, task: Task, progress: Progress) -> Outcome:
        light = True
        last = object()
        while True:
            if light:
                response = self.http.call("GET", self._task_url(task, "/status"), headers=self.headers(),
                                          label="status")
                if response.status in (404, 405):
                    light = False  # no light endpoint here: poll the whole task
                    continue
                status = self._envelope(response, "status poll").get("status")
                # The whole task when the status moved, or looks final (a stale GET must not stall the wait).
                if status != last or self._terminal({"status": status}):
                    last = status
                    data = self._get(task)
                else:
                    data = task.data
            else:
                data = self._get(task)
            self._progress(data, progress)
            if self._terminal(data):
                return self._finish(task, data)
            self.control.sleep(self.settings.poll_interval_s)

    def _progress(self, data: dict, progress: Progress) -> None:
        logs = data.get("logs") or []
        text = " ".join(str(e.get("content", "")) if isinstance(e, dict) else str(e) for e in logs) \
            if isinstance(logs, list) else str(logs)
        self.report(progress, steps_progress(text), status_name(data, self.numbering))

    def _finish(self, task: Task, data: dict) -> Outcome:
        name = status_name(data, self.numbering)
        task.info["status"] = name
        error = data.get("error") or ""
        if name == "completed":
            output = data.get("output") or {}
            url = image_url(output)
            if not url:
                raise MalformedReply(f"the task completed without an image in its output: {json.dumps(output)[:200]}",
                                     hint="try again; report it to inference.sh if it repeats")
            info = {"status": name}
            if isinstance(output, dict) and output.get("output_meta"):
                info["output_meta"] = output["output_meta"]
            return Outcome(url, info=info)
        if name == "failed":
            if MODERATION.search(str(error)):
                raise ModerationError(f"the job was refused by moderation: {error}",
                                      hint="change the prompt; moderation is decided by the provider")
            raise TaskFailed(f"the job failed: {error or 'no reason given'}", hint="try again, or change the inputs")
        if name == "rejected":
            raise PaymentRequired(f"the job was rejected before it ran: {error or 'no reason given'}",
                                  hint="check the balance and payment method of your inference.sh account")
        raise TaskCancelled("the job was cancelled at the provider", hint="run it again")

    def cancel(self, task: Task) -> bool:
        response = self.side_transport().call("POST", self._task_url(task, "/cancel"), headers=self.headers(),
                                              json_body={}, label="cancel")
        return response.ok

    def refresh(self, task: Task) -> str | None:
        data = self._get(task)
        return image_url(data.get("output")) if self._terminal(data) else None
