"""HTTP for the providers, on the standard library only: a timeout on every connection and reply, retries
with exponential backoff and jitter that honour Retry-After, submits that are never blindly repeated, the
user's cancel and the job's deadline heeded while waiting, size caps, no redirects followed with a key.

A call returns the final Response whatever its status; the provider turns statuses into errors, because
only it knows its error bodies. Failures without any response raise here.
"""
from __future__ import annotations

import email.utils
import http.client
import json
import queue
import selectors
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

from .. import __version__
from .control import Control
from .errors import DownloadRefused, Interrupted, MalformedReply, ProviderUnavailable, SubmitUncertain
from .settings import RemoteSettings

# 408, 429 and the 5xx a gateway or an overloaded provider answers (524: Cloudflare timeout, CometAPI).
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 524})
API_BODY_CAP = 8 * 1024 * 1024
_CHUNK = 64 * 1024
USER_AGENT = f"flux-juiced/{__version__}"


class _NotSent(Exception):
    """The connection could not be opened: the request never left, so repeating it is safe."""


class _NoAnswer(Exception):
    """The request was sent but no complete reply came (timeout, reset): the server may have acted on it."""


@dataclass
class Response:
    status: int
    headers: dict
    body: bytes
    url: str
    retry_note: str = ""  # why the transport stopped retrying, when it did

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)

    @property
    def content_type(self) -> str:
        return (self.header("content-type") or "").split(";")[0].strip().lower()

    def text(self, limit: int = 300) -> str:
        text = self.body[:limit * 4].decode("utf-8", "replace").strip()
        return text if len(text) <= limit else text[:limit] + "..."

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def is_html(response: Response) -> bool:
    return response.content_type in ("text/html", "application/xhtml+xml") or response.body.lstrip()[:1] == b"<"


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(attempt: int, settings: RemoteSettings) -> float:
    """min(cap, base * 2**(attempt-1)) with jitter x[0.5, 1.5], never above the cap."""
    raw = min(settings.backoff_cap_s, settings.backoff_base_s * 2 ** (attempt - 1))
    return min(settings.backoff_cap_s, raw * settings.rng.uniform(0.5, 1.5))


def check_http_url(url: str, what: str) -> str:
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        shown = url if isinstance(url, str) and len(url) < 120 else f"{str(url)[:60]}..."
        raise DownloadRefused(f"the {what} is not an http(s) address: {shown!r}",
                              hint="only http(s) links are fetched; report this reply to the provider")
    return url


@dataclass
class Stats:
    calls: Counter = field(default_factory=Counter)
    retries: int = 0
    waited_s: float = 0.0


class Transport:
    def __init__(self, settings: RemoteSettings, control: Control):
        self.settings = settings
        self.control = control
        self.stats = Stats()

    # --- one attempt ----------------------------------------------------------------------------------
    def _connect(self, url: str) -> tuple[http.client.HTTPConnection, str]:
        parts = urlsplit(url)
        timeout = max(0.05, min(self.settings.connect_timeout_s, self.control.remaining() or 0.05))
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout,
                                               context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        try:
            conn.connect()
        except (OSError, http.client.HTTPException) as exc:  # refused, DNS, connect timeout, TLS
            conn.close()
            raise _NotSent(f"cannot connect to {parts.hostname}:{parts.port or parts.scheme}: "
                           f"{type(exc).__name__} {exc}") from None
        path = parts.path or "/"
        return conn, path + (f"?{parts.query}" if parts.query else "")

    def _wait_for_reply(self, conn, interruptible: bool) -> None:
        """Block until the reply starts, looking at the cancel button meanwhile (not during a submit,
        whose answer carries the id we need to cancel)."""
        limit = time.monotonic() + min(self.settings.read_timeout_s, self.control.remaining() + 0.5)
        with selectors.DefaultSelector() as selector:  # not select(): no limit on descriptor numbers
            selector.register(conn.sock, selectors.EVENT_READ)
            while True:
                if interruptible:
                    self.control.check()
                left = limit - time.monotonic()
                if left <= 0:
                    raise _NoAnswer(f"no reply within {self.settings.read_timeout_s:g} s")
                if selector.select(min(0.05, left)):
                    return

    def _read_body(self, resp, cap: int) -> bytes:
        length = resp.getheader("content-length")
        if length and length.isdigit() and int(length) > cap:
            raise DownloadRefused(f"the reply is {int(length) / 1e6:.1f} MB, over the cap of {cap / 1e6:.1f} MB",
                                  hint="raise FLUX_JUICED_REMOTE_MAX_DOWNLOAD_MB if this size is expected")
        chunks, size = [], 0
        while True:
            chunk = resp.read(_CHUNK)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > cap:
                raise DownloadRefused(f"the reply exceeds the cap of {cap / 1e6:.1f} MB",
                                      hint="raise FLUX_JUICED_REMOTE_MAX_DOWNLOAD_MB if this size is expected")
            chunks.append(chunk)
            if self.control.remaining() <= 0:
                raise _NoAnswer("the deadline passed while reading the reply")

    def send_once(self, method: str, url: str, headers: dict | None = None, body: bytes | None = None,
                  interruptible: bool = True, cap: int = API_BODY_CAP) -> Response:
        conn, target = self._connect(url)
        try:
            conn.sock.settimeout(max(0.05, self.settings.read_timeout_s))
            all_headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", "Connection": "close"}
            all_headers.update(headers or {})
            try:
                conn.request(method, target, body=body, headers=all_headers)
                self._wait_for_reply(conn, interruptible)
                resp = conn.getresponse()
                data = self._read_body(resp, cap)
            except (OSError, http.client.HTTPException) as exc:
                raise _NoAnswer(f"{type(exc).__name__} {exc}".strip()) from None
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data, url)
        finally:
            conn.close()

    # --- the retry policy -----------------------------------------------------------------------------
    def call(self, method: str, url: str, *, headers: dict | None = None, json_body=None, submit: bool = False,
             label: str = "", cap: int = API_BODY_CAP) -> Response:
        """One logical call with retries. Reads retry on connection failures, timeouts and 408/429/5xx.
        A submit (it may create a billed job) retries only when the connection could not be opened or the
        answer was 429; a submit that got no answer raises SubmitUncertain instead of being repeated."""
        body = None
        headers = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers.setdefault("Content-Type", "application/json")
        host = urlsplit(url).hostname
        attempt = 0
        while True:
            attempt += 1
            self.control.check()
            self.stats.calls[label or method] += 1
            try:
                response = self.send_once(method, url, headers, body, interruptible=not submit, cap=cap)
            except _NotSent as exc:
                if attempt >= self.settings.max_attempts:
                    raise ProviderUnavailable(f"{exc} (after {attempt} attempts)",
                                              hint="check the network, or the provider's status page") from None
                self._wait(backoff_delay(attempt, self.settings))
                continue
            except _NoAnswer as exc:
                if submit:
                    raise SubmitUncertain(
                        f"the submit to {host} got no answer ({exc}); a job may have been created and billed",
                        hint="look at the provider's dashboard before running again; the pack does not resubmit "
                             "on its own so that no job is billed twice") from None
                if attempt >= self.settings.max_attempts:
                    raise ProviderUnavailable(f"no answer from {host} after {attempt} attempts ({exc})",
                                              hint="try again later") from None
                self._wait(backoff_delay(attempt, self.settings))
                continue
            if response.status not in RETRYABLE_STATUSES or (submit and response.status != 429):
                return response
            if response.status == 504 and (response.header("x-fal-request-timeout-type") or "").lower() == "user":
                return response  # our own start timeout at fal: repeating it cannot help
            if attempt >= self.settings.max_attempts:
                response.retry_note = f"still {response.status} after {attempt} attempts"
                return response
            delay = self._delay(attempt, response)
            if delay is None:
                return response
            self._wait(delay)

    def _delay(self, attempt: int, response: Response) -> float | None:
        asked = retry_after_seconds(response.header("retry-after"))
        if asked is None:
            return backoff_delay(attempt, self.settings)
        if asked > self.settings.max_retry_after_s or asked > self.control.remaining():
            response.retry_note = (f"the provider asks to wait {asked:g} s before retrying, beyond "
                                   f"{'the deadline' if asked <= self.settings.max_retry_after_s else 'the limit'}")
            return None
        return asked

    def _wait(self, seconds: float) -> None:
        self.stats.retries += 1
        self.stats.waited_s += seconds
        self.control.sleep(seconds)

    # --- JSON and files -------------------------------------------------------------------------------
    @staticmethod
    def parse_json(response: Response):
        """The JSON body of a reply; MalformedReply for HTML, a non-JSON content type or invalid JSON."""
        if is_html(response):
            raise MalformedReply(f"HTTP {response.status} answered with a web page, not JSON: {response.text(120)!r}",
                                 hint="check the provider's base address (a proxy or a wrong path answers HTML)")
        kind = response.content_type
        if kind and not (kind.endswith("json") or kind.endswith("+json") or kind == "text/plain"):
            raise MalformedReply(f"HTTP {response.status} answered {kind}, not JSON",
                                 hint="check the provider's base address, or try again later")
        try:
            return json.loads(response.body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MalformedReply(f"HTTP {response.status} answered invalid JSON ({exc.__class__.__name__}: "
                                 f"{exc}): {response.text(120)!r}", hint="try again later") from None

    def download(self, url: str, max_redirects: int = 5) -> Response:
        """GET a result file without any key, following up to a few redirects to other http(s) hosts."""
        for _ in range(max_redirects + 1):
            check_http_url(url, "result link")
            response = self.call("GET", url, headers={"Accept": "image/*"}, label="download",
                                 cap=self.settings.max_download_bytes)
            location = response.header("location")
            if response.status in (301, 302, 303, 307, 308) and location:
                url = urljoin(url, location)
                continue
            return response
        raise MalformedReply(f"more than {max_redirects} redirects while downloading the result")

    # --- streams --------------------------------------------------------------------------------------
    def open_stream(self, url: str, headers: dict) -> "LineStream":
        """A GET whose reply is read line by line in the background (NDJSON or SSE)."""
        self.control.check()
        self.stats.calls["stream"] += 1
        try:
            conn, target = self._connect(url)
        except _NotSent as exc:
            raise ProviderUnavailable(str(exc)) from None
        try:
            conn.sock.settimeout(max(0.05, self.settings.read_timeout_s))
            conn.request("GET", target, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity",
                                                 "Cache-Control": "no-cache", **headers})
            self._wait_for_reply(conn, True)
            resp = conn.getresponse()
        except _NoAnswer as exc:
            conn.close()
            raise ProviderUnavailable(f"the stream did not start: {exc}") from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise ProviderUnavailable(f"the stream did not start: {type(exc).__name__} {exc}") from None
        except Interrupted:
            conn.close()
            raise
        return LineStream(conn, resp, url)


class LineStream:
    """Lines of a streamed reply, read by a thread so the caller can wait with a timeout and stop at once."""

    def __init__(self, conn, resp, url: str):
        self.conn, self.resp, self.url = conn, resp, url
        self.status = resp.status
        self.headers = {k.lower(): v for k, v in resp.getheaders()}
        self._items: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._pump, daemon=True, name="flux-juiced-stream")
        if resp.status == 200:
            self._thread.start()

    @property
    def content_type(self) -> str:
        return (self.headers.get("content-type") or "").split(";")[0].strip().lower()

    def error_body(self) -> Response:
        """The whole body of a stream that did not start (non-200), as a Response."""
        try:
            body = self.resp.read(API_BODY_CAP)
        except (OSError, http.client.HTTPException):
            body = b""
        self.close()
        return Response(self.status, self.headers, body, self.url)

    def _pump(self):
        try:
            while True:
                line = self.resp.readline(API_BODY_CAP)
                if not line:
                    self._items.put(("eof", None))
                    return
                self._items.put(("line", line))
        except (OSError, ValueError, http.client.HTTPException) as exc:
            self._items.put(("error", exc))

    def next(self, timeout: float):
        """("line", bytes), ("eof", None), ("error", exc), or ("wait", None) when nothing came in time."""
        try:
            return self._items.get(timeout=timeout)
        except queue.Empty:
            return ("wait", None)

    def close(self):
        try:
            self.conn.sock and self.conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.conn.close()
