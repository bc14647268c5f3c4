"""What every provider shares: its key and base address, turning HTTP statuses and error bodies into clear
errors, downloading the result (once more with a fresh link if the first one expired), cancelling."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from typing import Callable
from urllib.parse import urlsplit

from ..control import Control
from ..errors import (AuthError, InvalidRequest, MalformedReply, PaymentRequired, ProviderUnavailable, RateLimited,
                      RemoteError, ResultExpired)
from ..http import Response, Transport, is_html
from ..keys import KEY_ENV, where_keys_go
from ..request import Adjustments, RemoteRequest
from ..settings import RemoteSettings, base_url

log = logging.getLogger("flux_juiced.remote")

Progress = Callable[[float, str], None]
_STEPS = re.compile(r"(\d+)\s*/\s*(\d+)")  # "14/28" in tqdm-style logs
IMAGE_TYPES = ("image/", "application/octet-stream", "binary/octet-stream")


@dataclass
class Task:
    id: str
    data: dict = field(default_factory=dict)   # what the provider said about it, last seen
    info: dict = field(default_factory=dict)   # provider facts for the metadata (cost, metrics, ...)


@dataclass
class Outcome:
    """A finished job: where its image is and what the provider reported."""
    image_url: str
    seed: int | None = None
    info: dict = field(default_factory=dict)


def error_detail(response: Response) -> str:
    """The readable part of an error body in any of the providers' shapes."""
    if not response.body:
        return ""
    if is_html(response):
        return "a web page (HTML) instead of JSON"
    try:
        import json

        body = json.loads(response.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return response.text(200)
    if isinstance(body, dict):
        detail = body.get("detail")
        if isinstance(detail, list):  # FastAPI validation: [{"loc": [...], "msg": ...}]
            return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:]) or 'input'}: {d.get('msg', d)}"
                             if isinstance(d, dict) else str(d) for d in detail)[:400]
        error = body.get("error")
        if isinstance(error, dict):  # inference.sh v1, CometAPI
            return str(error.get("message") or error.get("code") or error)[:400]
        for key in ("detail", "title", "message", "error"):
            if isinstance(body.get(key), str) and body[key]:
                return body[key][:400]
    return response.text(200)


def steps_progress(text) -> float | None:
    """The fraction done from the last "k/n" in tqdm-like logs, if any."""
    if not text:
        return None
    matches = _STEPS.findall(text if isinstance(text, str) else " ".join(map(str, text)))
    for done, total in reversed(matches):
        done, total = int(done), int(total)
        if 0 < total <= 1000 and done <= total:
            return done / total
    return None


class Provider:
    name = ""            # registry name, the node's choice and --provider
    label = ""           # for people
    model = ""           # the model or app at the provider
    base_env = ""        # environment variable overriding the base address
    default_base = ""
    trusted_hosts: tuple = ()   # hosts (and their subdomains) that may receive the key, besides the base's
    expiry_hint = "download the result right away; run the job again for a fresh image"

    def __init__(self, key: str, settings: RemoteSettings, control: Control):
        self.key = key
        self.settings = settings
        self.control = control
        self.http = Transport(settings, control)
        self.base = base_url(self.name, self.base_env, self.default_base)

    # --- to be written by each provider ---------------------------------------------------------------
    def build_input(self, request: RemoteRequest, adjust: Adjustments) -> dict:
        raise NotImplementedError

    def submit(self, payload: dict) -> Task:
        raise NotImplementedError

    def wait(self, task: Task, progress: Progress) -> Outcome:
        raise NotImplementedError

    def cancel(self, task: Task) -> bool:
        """Ask the provider to stop the job; False where it has no way to (the job then runs out)."""
        return False

    def refresh(self, task: Task) -> str | None:
        """A fresh result link after the first one failed, or None."""
        return None

    def auth_headers(self) -> dict:
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------------------------
    def headers(self, url: str | None = None, **extra) -> dict:
        """JSON headers, with the key only for the provider's own hosts."""
        headers = {"Accept": "application/json", **extra}
        if url is None or self.trusted(url):
            headers.update(self.auth_headers())
        return headers

    def trusted(self, url: str) -> bool:
        host = (urlsplit(url).hostname or "").lower()
        if host == (urlsplit(self.base).hostname or "").lower():
            return True
        return urlsplit(url).scheme == "https" and any(host == h or host.endswith("." + h) for h in self.trusted_hosts)

    def same_host_or(self, url, fallback: str) -> str:
        """A URL from a reply if the key may go there, else the one built from the base address."""
        return url if isinstance(url, str) and url.startswith(("http://", "https://")) and self.trusted(url) \
            else fallback

    def json(self, response: Response, during: str):
        """The JSON of a successful reply, or the matching error."""
        if not response.ok:
            self.raise_for(response, during)
        return self.http.parse_json(response)

    def raise_for(self, response: Response, during: str):
        status, detail = response.status, error_detail(response)
        said = f": {detail}" if detail else ""
        if 300 <= status < 400:
            raise MalformedReply(f"the {during} was redirected (HTTP {status} to {response.header('location')!r})",
                                 hint=f"check the base address ({self.base_env}); a wrong path is often redirected")
        if status in (401, 403):
            raise AuthError(f"the key was refused during the {during} (HTTP {status}{said})",
                            hint=f"check the key in {KEY_ENV[self.name]}: " + where_keys_go(self.name), status=status)
        if status == 402:
            raise PaymentRequired(f"payment required (HTTP 402{said})",
                                  hint="add credits or a payment method in your account at the provider",
                                  status=status)
        if status == 429:
            raise RateLimited(f"rate limited during the {during} (HTTP 429{said}); {response.retry_note}".rstrip("; "),
                              hint="wait a minute, or run fewer jobs at the same time", status=status)
        if status in (404, 410) and during != "submit":
            raise ResultExpired(f"the provider no longer knows this job (HTTP {status}{said})",
                                hint=self.expiry_hint, status=status)
        if status in (400, 404, 409, 412, 422):
            raise InvalidRequest(f"the {during} was refused (HTTP {status}{said})",
                                 hint="fix the input named above; docs/remote.md lists what each provider accepts",
                                 status=status)
        if status >= 500:
            extra = f"; {response.retry_note}" if response.retry_note else ""
            if during == "submit":
                raise ProviderUnavailable(
                    f"the submit failed (HTTP {status}{said}){extra}; it was not repeated, so nothing is billed twice",
                    hint="try again in a minute; if it keeps failing, look for a stray job in the provider's dashboard",
                    status=status)
            raise ProviderUnavailable(f"the provider failed during the {during} (HTTP {status}{said}){extra}",
                                      hint="try again later; the provider's status page may say more", status=status)
        raise RemoteError(f"unexpected HTTP {status} during the {during}{said}", status=status,
                          hint="try again later")

    def fetch(self, task: Task, url: str) -> tuple[bytes, str]:
        """The result file's bytes and content type; one retry with a fresh link if the link has expired."""
        for attempt in (1, 2):
            response = self.http.download(url)
            if response.ok:
                kind = response.content_type
                if kind and not kind.startswith(IMAGE_TYPES):
                    raise MalformedReply(f"the result link answered {kind}, not an image ({response.text(80)!r})",
                                         hint=self.expiry_hint)
                return response.body, kind
            if response.status in (401, 403, 404, 410) and attempt == 1:
                fresh = self.refresh(task)
                if fresh:
                    log.info("FLUX.1 Juiced: %s result link answered %s; trying a fresh one", self.name,
                             response.status)
                    url = fresh
                    continue
            if response.status in (401, 403, 404, 410):
                raise ResultExpired(f"the result link answered HTTP {response.status}: it has expired or was removed",
                                    hint=self.expiry_hint, status=response.status)
            self.raise_for(response, "download")
        raise AssertionError("unreachable")

    def side_transport(self, seconds: float = 5.0) -> Transport:
        """A transport for the cancel request: it must go out after the user cancelled or the deadline passed."""
        settings = replace(self.settings, max_attempts=2, read_timeout_s=min(self.settings.read_timeout_s, seconds))
        return Transport(settings, Control(seconds))

    def best_effort_cancel(self, task: Task | None) -> bool:
        if task is None:
            return False
        try:
            return self.cancel(task)
        except Exception as exc:  # cancelling is a courtesy: never hide the reason we stopped
            log.warning("FLUX.1 Juiced: %s cancel of %s failed: %s", self.name, task.id, type(exc).__name__)
            return False

    def report(self, progress: Progress | None, fraction: float | None, text: str) -> None:
        if progress is not None:
            progress(fraction, text)
