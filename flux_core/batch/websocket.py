"""A small websocket client (RFC 6455) on the standard library, enough to follow a ComfyUI server:
the opening handshake, reading text and binary messages (fragmented or not), answering pings, closing.

The pack's runtime dependencies stay numpy, safetensors, tokenizers and Pillow, so no websocket package.
Only client-to-server frames are masked, as the RFC requires; no extensions (no compression) are offered.
"""
from __future__ import annotations

import base64
import hashlib
import os
import socket
import ssl
import struct
import urllib.parse

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # fixed by RFC 6455 section 1.3
CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MAX_MESSAGE = 64 << 20  # a ComfyUI preview is far smaller; refuse anything absurd


class WebSocketError(ConnectionError):
    pass


class WebSocketClosed(WebSocketError):
    pass


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


class WebSocket:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = bytearray()
        self.closed = False
        self._fragments: list[bytes] = []
        self._fragment_opcode = None

    @classmethod
    def connect(cls, url: str, timeout: float = 10.0, headers: dict | None = None) -> "WebSocket":
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss"):
            raise WebSocketError(f"not a websocket address: {url}")
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        sock = socket.create_connection((parts.hostname, port), timeout=timeout)
        try:
            if parts.scheme == "wss":
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
            key = base64.b64encode(os.urandom(16)).decode()
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
            lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
                     f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
            lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            ws = cls(sock)
            status, response_headers = ws._read_handshake()
            if status != 101:
                raise WebSocketError(f"{url}: the server answered {status} instead of switching to websocket")
            if response_headers.get("sec-websocket-accept") != accept_key(key):
                raise WebSocketError(f"{url}: wrong Sec-WebSocket-Accept in the handshake")
            return ws
        except BaseException:
            sock.close()
            raise

    def _read_handshake(self) -> tuple[int, dict]:
        while b"\r\n\r\n" not in self.buffer:
            if len(self.buffer) > 65536:
                raise WebSocketError("handshake response too long")
            self._fill()
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        self.buffer = bytearray(rest)  # frames may follow the handshake at once
        lines = head.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split()[1])
        except (IndexError, ValueError):
            raise WebSocketError(f"not an HTTP response: {lines[0][:80]!r}") from None
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    def _fill(self):
        chunk = self.sock.recv(65536)  # socket.timeout propagates; the buffer keeps what came so far
        if not chunk:
            self.closed = True
            raise WebSocketClosed("the server closed the connection")
        self.buffer += chunk

    def _parse_frame(self):
        """(fin, opcode, payload) of the frame at the head of the buffer, consumed; None if incomplete."""
        buf = self.buffer
        if len(buf) < 2:
            return None
        fin, opcode = buf[0] & 0x80, buf[0] & 0x0F
        masked, length = buf[1] & 0x80, buf[1] & 0x7F
        pos = 2
        if length == 126:
            if len(buf) < 4:
                return None
            length, pos = struct.unpack(">H", buf[2:4])[0], 4
        elif length == 127:
            if len(buf) < 10:
                return None
            length, pos = struct.unpack(">Q", buf[2:10])[0], 10
        if length > MAX_MESSAGE:
            raise WebSocketError(f"frame of {length} bytes is too large")
        mask = b""
        if masked:
            if len(buf) < pos + 4:
                return None
            mask, pos = bytes(buf[pos:pos + 4]), pos + 4
        if len(buf) < pos + length:
            return None
        payload = bytes(buf[pos:pos + length])
        del buf[:pos + length]
        if mask:
            payload = _xor(payload, mask)
        return bool(fin), opcode, payload

    def recv(self, timeout: float | None = None) -> tuple[int, bytes]:
        """The next data message as (TEXT or BINARY, payload). socket.timeout when none came in time;
        WebSocketClosed once the server has closed."""
        if self.closed:
            raise WebSocketClosed("the connection is closed")
        self.sock.settimeout(timeout)
        while True:
            frame = self._parse_frame()
            if frame is None:
                self._fill()
                continue
            fin, opcode, payload = frame
            if opcode == PING:
                self._send(PONG, payload)
            elif opcode == PONG:
                pass
            elif opcode == CLOSE:
                if not self.closed:
                    self.closed = True
                    try:
                        self._send(CLOSE, payload[:2])
                    except OSError:
                        pass
                code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
                raise WebSocketClosed(f"the server closed the connection (code {code})")
            elif opcode in (TEXT, BINARY):
                if fin:
                    return opcode, payload
                self._fragment_opcode, self._fragments = opcode, [payload]
            elif opcode == CONT and self._fragment_opcode is not None:
                self._fragments.append(payload)
                if fin:
                    message = b"".join(self._fragments)
                    opcode, self._fragment_opcode, self._fragments = self._fragment_opcode, None, []
                    return opcode, message
            else:
                raise WebSocketError(f"unexpected frame opcode {opcode:#x}")

    def _send(self, opcode: int, payload: bytes = b""):
        header = bytearray([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header.append(0x80 | n)
        elif n < 65536:
            header += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        self.sock.sendall(bytes(header) + mask + _xor(payload, mask))

    def send_text(self, text: str):
        self._send(TEXT, text.encode())

    def close(self, code: int = 1000):
        if not self.closed:
            self.closed = True
            try:
                self._send(CLOSE, struct.pack(">H", code))
            except OSError:
                pass
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _xor(data: bytes, mask: bytes) -> bytes:
    if not data:
        return b""
    repeated = (mask * (len(data) // 4 + 1))[:len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(data), "big")
