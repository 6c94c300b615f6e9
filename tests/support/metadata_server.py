"""A loopback stand-in for the cloud metadata services that announce preemption, for the notice tests.

It answers as each provider documents: EC2's IMDSv2 (a token from `PUT /latest/api/token`,
required by `GET /latest/meta-data/spot/instance-action`: 404 without a notice, 200 with
`{"action", "time"}` with one), GCE's `instance/preempted` (only with `Metadata-Flavor:
Google`; `FALSE` / `TRUE`), Azure's Scheduled Events (only with `Metadata: true` and an
`api-version`; a `Preempt` event for this VM, whose name `instance/compute/name` tells) and
a plain notice URL (`/notice`: 404, then 200 with a body). `notice` switches every provider
from "no notice" to "notice"; `hang` makes every request wait (a service that never answers).
Each request is recorded. `base` is the URL to put after `aws=`, `gcp=` or `azure=`.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

PROBE_PATHS = {
    "aws": "/latest/meta-data/spot/instance-action",
    "gcp": "/computeMetadata/v1/instance/preempted",
    "azure": "/metadata/scheduledevents",
    "url": "/notice",
}


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A client that gave up (the watcher's timeout, a stopped test) is expected: no traceback."""


class MetadataServer:
    """What the metadata services answer, switchable by the test; every request is recorded."""

    def __init__(self):
        self.notice = threading.Event()
        self.hang = threading.Event()  # requests wait for `release` (a service that never answers)
        self.release = threading.Event()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.token = secrets.token_urlsafe(24)  # made up per test, never a literal
        self.token_ttls: list[str] = []
        self.vm_name = "dt-node-0"
        self.name_status = 200
        self.azure_events: list[dict] | None = None  # None: a Preempt event for this VM
        self.url_body = b"instance will be reclaimed"
        self.notices_served: list[float] = []  # time.time() of every answer that announced a notice
        self.httpd = _QuietServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def count(self, path: str) -> int:
        with self.lock:
            return sum(1 for _, p, _ in self.requests if urlsplit(p).path == path)

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None):
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _announced(self):
                with server.lock:
                    server.notices_served.append(time.time())

            def _record(self):
                with server.lock:
                    server.requests.append((self.command, self.path, dict(self.headers)))
                if server.hang.is_set():
                    server.release.wait(60)

            def do_PUT(self):
                self._record()
                if self.path != "/latest/api/token":
                    return self._reply(404)
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
                if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                    return self._reply(400)
                server.token_ttls.append(ttl)
                self._reply(200, server.token.encode())

            def do_GET(self):
                self._record()
                parts = urlsplit(self.path)
                route = {"/latest/meta-data/spot/instance-action": self._aws,
                         "/computeMetadata/v1/instance/preempted": self._gcp,
                         "/metadata/scheduledevents": self._azure,
                         "/metadata/instance/compute/name": self._azure_name,
                         "/notice": self._url}.get(parts.path)
                return route(parts.query) if route else self._reply(404)

            def _aws(self, query):
                if self.headers.get("X-aws-ec2-metadata-token") != server.token:
                    return self._reply(401)  # IMDSv2 only, as hardened instances are configured
                if not server.notice.is_set():
                    return self._reply(404)
                body = json.dumps({"action": "terminate", "time": "2026-09-01T12:00:00Z"}).encode()
                self._announced()
                self._reply(200, body, {"Content-Type": "application/json"})

            def _gcp(self, query):
                if self.headers.get("Metadata-Flavor") != "Google":
                    return self._reply(403)
                preempted = server.notice.is_set()
                if preempted:
                    self._announced()
                self._reply(200, b"TRUE" if preempted else b"FALSE",
                            {"Metadata-Flavor": "Google", "Content-Type": "application/text"})

            def _azure(self, query):
                if self.headers.get("Metadata") != "true" or "api-version=" not in query:
                    return self._reply(400)
                events = []
                if server.notice.is_set():
                    events = server.azure_events if server.azure_events is not None else [
                        {"EventId": "602d9444-d2cd-49c7-8624-8643e7171297", "EventType": "Preempt",
                         "ResourceType": "VirtualMachine", "Resources": [server.vm_name],
                         "EventStatus": "Scheduled", "NotBefore": "Mon, 01 Sep 2026 12:00:30 GMT",
                         "Description": "", "EventSource": "Platform", "DurationInSeconds": -1}]
                body = json.dumps({"DocumentIncarnation": 2 if events else 1, "Events": events}).encode()
                if events:
                    self._announced()
                self._reply(200, body, {"Content-Type": "application/json"})

            def _azure_name(self, query):
                if self.headers.get("Metadata") != "true":
                    return self._reply(400)
                self._reply(server.name_status, server.vm_name.encode() if server.name_status == 200 else b"")

            def _url(self, query):
                if not server.notice.is_set():
                    return self._reply(404)
                self._announced()
                self._reply(200, server.url_body)

        return Handler

    def source(self, provider: str) -> str:
        """The `--preemption-notice` value that points `provider` at this server."""
        return f"{self.base}/notice" if provider == "url" else f"{provider}={self.base}"

    def __enter__(self) -> "MetadataServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
