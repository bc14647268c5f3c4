"""The machinery every fake provider shares: a threaded HTTP server on 127.0.0.1, request records and
counters, fault switches consumed in order, time-based job progress, and result files with an expiry.

A fault is queued per route ("submit", "poll", "status", "result", "stream", "cancel", "download") with
fake.fault(route, kind, times=1, **params). Kinds every fake understands:
  status             answer `code` with `body` (dict -> JSON) and `headers` (e.g. {"Retry-After": "1"})
  html               answer `code` (default 502) with an nginx-style HTML page and no request id
  invalid_json       answer 200 with a body that is not JSON (application/json)
  wrong_content_type answer 200 with an HTML page as text/html
  slow               sleep `delay` seconds, then answer normally
  drop               close the connection without an answer
  echo_key           answer 401 with the received credentials inside the error body
"""
from __future__ import annotations

import io
import json
import re
import threading
import time
import uuid
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

NGINX_502 = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1>"
             b"</center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")

_IMAGE_CACHE: dict = {}


def make_image(width: int, height: int, fmt: str = "png") -> bytes:
    """A small gradient picture in jpeg, png or webp (not blank, so decoding is really checked)."""
    key = (width, height, fmt)
    if key not in _IMAGE_CACHE:
        from PIL import Image

        image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
        out = io.BytesIO()
        image.save(out, {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt])
        _IMAGE_CACHE[key] = out.getvalue()
    return _IMAGE_CACHE[key]


class Request:
    def __init__(self, handler: BaseHTTPRequestHandler, body: bytes):
        parts = urlsplit(handler.path)
        self.method = handler.command
        self.path = parts.path
        self.query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        self.headers = {k.lower(): v for k, v in handler.headers.items()}
        self.raw = body
        self.time = time.monotonic()
        try:
            self.json = json.loads(body) if body else None
        except ValueError:
            self.json = None


class Reply(Exception):
    """Raised by a route to answer at once."""

    def __init__(self, code: int, body=None, headers: dict | None = None, content_type: str | None = None):
        self.code, self.body, self.headers, self.content_type = code, body, headers or {}, content_type


class FakeProvider:
    auth_header = "authorization"
    auth_prefix = "Bearer "
    routes: list = []   # (method, regex, route name, handler method name)

    def __init__(self, key: str = "test-key-0123456789", run_s: float = 0.2, port: int = 0):
        self.key = key
        self.run_s = run_s            # how long a job takes from submit to done
        self.link_ttl = 600.0         # result links expire after this many seconds
        self.hold = False             # jobs keep running until cancelled
        self.counts: Counter = Counter()
        self.requests: list[tuple[str, Request]] = []
        self.faults: dict = defaultdict(list)
        self.jobs: dict = {}
        self.files: dict = {}         # token -> (bytes, content type, created)
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    # --- life --------------------------------------------------------------------------------------------
    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # --- switches and records ------------------------------------------------------------------------------
    def fault(self, route: str, kind: str, times: int = 1, **params):
        with self.lock:
            self.faults[route].extend([dict(kind=kind, **params)] * times)
        return self

    def _take_fault(self, route: str):
        with self.lock:
            return self.faults[route].pop(0) if self.faults[route] else None

    def received(self, route: str) -> list[Request]:
        return [r for name, r in self.requests if name == route]

    def times(self, route: str) -> list[float]:
        return [r.time for r in self.received(route)]

    # --- helpers for the provider fakes ------------------------------------------------------------------
    def new_id(self) -> str:
        return uuid.uuid4().hex[:20]

    def elapsed(self, job: dict) -> float:
        return time.monotonic() - job["created"]

    def phase(self, job: dict) -> str:
        """queued, running or done, by the time since submit (running forever while held)."""
        if job.get("cancelled"):
            return "cancelled"
        elapsed = self.elapsed(job)
        if elapsed < self.run_s / 3:
            return "queued"
        if elapsed < self.run_s or self.hold:
            return "running"
        return "done"

    def fraction(self, job: dict) -> float:
        return min(1.0, self.elapsed(job) / self.run_s) if self.run_s else 1.0

    def publish(self, data: bytes, content_type: str, ext: str) -> str:
        token = uuid.uuid4().hex
        with self.lock:
            self.files[token] = (data, content_type, time.monotonic())
        return f"{self.url}/files/{token}.{ext}?sig=abc"

    def authorized(self, req: Request) -> bool:
        return req.headers.get(self.auth_header) == self.auth_prefix + self.key

    def unauthorized(self, req: Request):
        raise Reply(401, {"detail": "Invalid or missing API key"})

    def expired_file(self, req: Request):
        raise Reply(403, "<Error><Code>AuthenticationFailed</Code></Error>", content_type="application/xml")

    # --- dispatch ----------------------------------------------------------------------------------------
    def _handler_class(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fake._dispatch(self, Request(self, body))

            do_GET = do_POST = do_PUT = do_DELETE = _any

        return Handler

    def _route(self, req: Request):
        """(route name, handler, path groups) for a request, or (None, None, ())."""
        if req.method == "GET" and req.path.startswith("/files/"):
            return "download", self.serve_file, ()
        for method, pattern, name, func in self.routes:
            match = re.fullmatch(pattern, req.path)
            if method == req.method and match:
                return name, getattr(self, func), match.groups()
        return None, None, ()

    def _dispatch(self, handler, req: Request):
        name, func, groups = self._route(req)
        with self.lock:
            self.counts[name or "unknown"] += 1
            self.requests.append((name or "unknown", req))
        try:
            if name is None:
                self.not_found(req)
            fault = self._take_fault(name)
            if fault:
                self._apply(fault, req)
            if name != "download" and not self.authorized(req) and self.needs_auth(name):
                self.unauthorized(req)
            result = func(req, *groups)
            if result is not None:
                raise Reply(200, result)
        except _Drop:
            handler.close_connection = True
        except Reply as reply:
            self._send(handler, reply)
        except _Stream as stream:
            self._send_stream(handler, stream)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def not_found(self, req: Request):
        raise Reply(404, {"detail": "Not Found"})

    def needs_auth(self, route: str) -> bool:
        return True

    def _apply(self, fault: dict, req: Request):
        kind = fault["kind"]
        if kind == "slow":
            time.sleep(fault.get("delay", 1.0))
            return
        if kind == "status":
            raise Reply(fault["code"], fault.get("body"), fault.get("headers"), fault.get("content_type"))
        if kind == "html":
            raise Reply(fault.get("code", 502), NGINX_502.decode(), content_type="text/html")
        if kind == "invalid_json":
            raise Reply(200, '{"status": "Pend', content_type="application/json")
        if kind == "wrong_content_type":
            raise Reply(200, "<html><body>Sign in</body></html>", content_type="text/html")
        if kind == "drop":
            raise _Drop()
        if kind == "echo_key":
            raise Reply(401, {"detail": f"Invalid key: {req.headers.get(self.auth_header)!r}"})
        raise AssertionError(f"unknown fault kind {kind}")

    def serve_file(self, req: Request):
        token = req.path.rsplit("/", 1)[-1].split(".")[0]
        with self.lock:
            entry = self.files.get(token)
        if entry is None:
            raise Reply(404, "not found", content_type="text/plain")
        data, content_type, created = entry
        if time.monotonic() - created > self.link_ttl:
            self.expired_file(req)
        raise Reply(200, data, content_type=content_type)

    # --- writing -----------------------------------------------------------------------------------------
    @staticmethod
    def _send(handler, reply: Reply):
        body = reply.body
        content_type = reply.content_type
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            content_type = content_type or "application/json"
        elif isinstance(body, str):
            body = body.encode()
        body = body or b""
        handler.send_response(reply.code)
        if body or content_type:
            handler.send_header("Content-Type", content_type or "application/json")
        for key, value in reply.headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(body)
        handler.close_connection = True

    @staticmethod
    def _send_stream(handler, stream: "_Stream"):
        handler.send_response(200)
        handler.send_header("Content-Type", stream.content_type)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.send_header("Connection", "close")
        handler.end_headers()
        try:
            for piece in stream.lines:
                data = piece.encode()
                handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                handler.wfile.flush()
            handler.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        handler.close_connection = True


class _Drop(Reply):
    def __init__(self):
        super().__init__(0)


class _Stream(Exception):
    """Raised by a route to answer with a chunked stream of text lines (a generator)."""

    def __init__(self, lines, content_type: str = "application/x-ndjson"):
        self.lines, self.content_type = lines, content_type
