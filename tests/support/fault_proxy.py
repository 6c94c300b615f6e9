"""A loopback HTTP proxy in front of moto that makes S3 flaky on purpose.

At the configured rates it answers `503 SlowDown` (with S3's XML error body),
`500 InternalError`, resets the TCP connection (SO_LINGER 0, so the client sees
an RST) before or after forwarding the request, or stalls longer than the client's
read timeout. `drop_conditional_puts = N` makes the next N `PUT`s carrying
`If-None-Match` (whose path contains `drop_path_contains`) reach moto (the object is
created) and then resets the connection instead of answering: the write happened,
the client saw a reset. `strip_headers = {"if-none-match"}` forwards requests without those
headers: moto then behaves like a server that ignores conditional writes.

Point a client at it with `AWS_ENDPOINT_URL=proxy.url`. Faults are drawn from a
seeded random generator, so a failing run can be replayed.
"""

from __future__ import annotations

import collections
import http.client
import random
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "expect", "content-length"}
_ERRORS = {
    "slowdown": (503, "Service Unavailable", "SlowDown", "Please reduce your request rate."),
    "internal": (500, "Internal Server Error", "InternalError",
                 "We encountered an internal error. Please try again."),
}


class _Reset(Exception):
    """Unwinds the handler after the connection was reset on purpose."""


class FaultProxy:
    def __init__(self, upstream: str, *, slowdown: float = 0.0, internal: float = 0.0, reset_before: float = 0.0,
                 reset_after: float = 0.0, stall: float = 0.0, stall_seconds: float = 3.0, seed: int = 0):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port or 80)
        self.rates = {}
        self.configure(slowdown=slowdown, internal=internal, reset_before=reset_before, reset_after=reset_after,
                       stall=stall)
        self.stall_seconds = stall_seconds
        self.drop_conditional_puts = 0
        self.drop_path_contains = ""
        self.strip_headers: set[str] = set()  # lower-case names of request headers not forwarded
        self.counts: collections.Counter = collections.Counter()
        self.log: list[tuple[str, str, str]] = []  # (method, path, fault or "ok")
        self.get_bytes: collections.Counter = collections.Counter()  # object path (no query) -> body bytes sent
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def configure(self, **rates: float) -> None:
        """Set fault rates (each a probability per request; they add up)."""
        for name, rate in rates.items():
            if name not in ("slowdown", "internal", "reset_before", "reset_after", "stall"):
                raise ValueError(f"unknown fault {name}")
            self.rates[name] = rate
        assert sum(self.rates.values()) <= 1.0

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FaultProxy":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self._server.handle_error = lambda request, address: None  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _pick(self, method: str, path: str, headers) -> str:
        with self._lock:
            self.counts["requests"] += 1
            if method == "PUT" and "If-None-Match" in headers and self.drop_conditional_puts > 0 \
                    and self.drop_path_contains in path:
                self.drop_conditional_puts -= 1
                fault = "drop_response"
            else:
                draw, fault = self._rng.random(), "ok"
                for name, rate in self.rates.items():
                    if draw < rate:
                        fault = name
                        break
                    draw -= rate
            self.counts[fault] += 1
            return fault

    def _note(self, method: str, path: str, fault: str) -> None:
        with self._lock:
            self.log.append((method, path, fault))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except (_Reset, OSError, ValueError):
            pass

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = lambda self: self._proxy()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _proxy(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self._read_body()
        fault = proxy._pick(self.command, self.path, self.headers)
        proxy._note(self.command, self.path, fault)
        if fault == "reset_before":
            self._reset()
        if fault in _ERRORS:
            self._error(*_ERRORS[fault])
            return
        if fault == "stall":
            time.sleep(proxy.stall_seconds)
        status, reason, headers, data = self._forward(proxy, body)
        if self.command == "GET":
            with proxy._lock:
                proxy.get_bytes[self.path.split("?", 1)[0]] += len(data)
        if fault in ("reset_after", "drop_response"):
            self._reset()
        self.send_response_only(status, reason)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        if self.command == "HEAD":
            length = dict((k.lower(), v) for k, v in headers).get("content-length")
            if length is not None:
                self.send_header("Content-Length", length)
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _forward(self, proxy: FaultProxy, body: bytes):
        conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP and name.lower() not in proxy.strip_headers:
                    conn.putheader(name, value)
            if body or self.command in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            response = conn.getresponse()
            data = response.read()
            return response.status, response.reason, response.getheaders(), data
        finally:
            conn.close()

    def _error(self, status: int, reason: str, code: str, message: str) -> None:
        data = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"<RequestId>fault-proxy</RequestId></Error>").encode()
        self.send_response_only(status, reason)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _reset(self) -> None:
        """Close with SO_LINGER 0: the kernel sends RST, the client sees 'connection reset by peer'."""
        sock = self.connection
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close_connection = True
        for stream in (self.rfile, self.wfile):
            try:
                stream.close()
            except (OSError, ValueError):
                pass
        sock.close()
        raise _Reset()
