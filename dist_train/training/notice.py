"""Cloud preemption notices: a thread polls the provider's metadata endpoint so a checkpoint is
committed before the machine goes away.

A spot or preemptible VM is warned before it is reclaimed (EC2: two minutes, GCE and Azure:
about 30 seconds), often before any SIGTERM reaches the pod. The watcher polls that warning
off the training thread, one request at a time with a bounded timeout: an endpoint that is
down, refuses, hangs or answers nonsense counts as "no notice" (logged once) and never slows
a step. The first notice latches `seen`; the trainer reads it at step boundaries.

How to wire it (run_training and the Trainer; one watcher per node, on local rank 0):

    notice = NoticeWatcher.from_config(cfg.train, local_rank=env.local_rank)  # None when off
    if notice is not None:
        log.info("%s", notice.describe())
        notice.start()
    try:
        ...  # Trainer(..., notice=notice).fit()
    finally:
        if notice is not None:
            notice.stop()

    # in the step-boundary vote, one more flag; all ranks see the MAX:
    flags = [..., int(notice is not None and notice.seen)]
    # the first boundary where the agreed flag is 1: save with reason "notice" and train on;
    # with cfg.train.exit_on_notice stop like a preemption instead (reason "notice", exit 75).

`--preemption-notice` values:

    aws     EC2 spot: IMDSv2 token (PUT /latest/api/token), then
            GET /latest/meta-data/spot/instance-action: 404 none, 200 {"action", "time"} notice
    gcp     GET /computeMetadata/v1/instance/preempted (Metadata-Flavor: Google): TRUE notice
    azure   GET /metadata/scheduledevents?api-version=2020-07-01 (Metadata: true): an event of
            type Preempt or Terminate for this VM (by compute name; for any VM when the name
            cannot be read) is a notice
    URL     an http(s):// URL: 200 with a non-empty body is a notice; 404 (or an empty body) none
    P=BASE  provider P with its base endpoint replaced, e.g. aws=http://127.0.0.1:8080
            (tests, or a metadata proxy); the default bases are 169.254.169.254 and
            metadata.google.internal

Requests go straight to the endpoint (no HTTP proxy from the environment: metadata services
must not be proxied). Tokens and headers are never logged; URLs are shown without user
information or query.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from dist_train.training.config import TrainConfig

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 2.0  # per request (connect, and each read); the watcher thread alone waits on it
STOP_JOIN_S = 0.5  # stop() does not wait for a request in flight: the thread is a daemon
MAX_BODY = 64 * 1024

AWS_TOKEN_TTL_S = 21600  # the IMDSv2 maximum
AWS_TOKEN_MARGIN_S = 300  # refresh this long before the token expires
AWS_TOKEN_RETRY_S = 60  # after a failed token request, IMDSv1 (no token) until the next try
AZURE_API_VERSION = "2020-07-01"
AZURE_NOTICE_EVENTS = ("Preempt", "Terminate")

DEFAULT_BASES = {
    "aws": "http://169.254.169.254",
    "gcp": "http://metadata.google.internal",
    "azure": "http://169.254.169.254",
}
SOURCE_HELP = "aws, gcp, azure, an http(s):// URL, or PROVIDER=http(s)://HOST[:PORT]"


class Unreachable(Exception):
    """The endpoint did not give a usable answer (refused, timed out, unexpected status)."""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes


def display_url(url: str) -> str:
    """scheme://host[:port]/path: no user information, no query (either could hold a secret)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


def _is_http_url(value: str) -> bool:
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def parse_source(value: str) -> tuple[str, str]:
    """`--preemption-notice` -> (provider, URL): provider is aws, gcp, azure or url."""
    text = value.strip()
    if text in DEFAULT_BASES:
        return text, DEFAULT_BASES[text]
    name, sep, base = text.partition("=")
    if sep and name in DEFAULT_BASES:
        if _is_http_url(base):
            return name, base.rstrip("/")
        raise ValueError(f"{name}= needs an http(s)://HOST[:PORT] base URL")
    if _is_http_url(text):
        return "url", text
    raise ValueError(f"must be {SOURCE_HELP}")


def check_source(value: str) -> str | None:
    """The config field's check: None when fine, else what it accepts."""
    try:
        parse_source(value)
    except ValueError as exc:
        return str(exc)
    return None


class Endpoint:
    """One base URL; every request is a fresh connection with a bounded timeout."""

    def __init__(self, base_url: str, timeout_s: float):
        parts = urlsplit(base_url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port
        self.base_path = parts.path.rstrip("/")
        self.timeout_s = timeout_s
        self.display = display_url(base_url)

    def request(self, method: str, path: str, headers: dict[str, str] | None = None) -> Response:
        factory = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = factory(self.host, self.port, timeout=self.timeout_s)
        try:
            conn.request(method, self.base_path + path, headers=headers or {})
            reply = conn.getresponse()
            return Response(reply.status, reply.read(MAX_BODY))
        except (OSError, http.client.HTTPException) as exc:  # refused, timeout, DNS, TLS, garbage
            raise Unreachable(type(exc).__name__ + (f": {exc}" if str(exc) else "")) from None
        finally:
            conn.close()


class AwsProbe:
    what = "EC2 spot instance-action"

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint
        self._token: str | None = None
        self._token_until = 0.0  # monotonic time the token is good until (with margin)
        self._retry_token_at = 0.0

    def _current_token(self) -> str | None:
        now = time.monotonic()
        if self._token is not None and now < self._token_until:
            return self._token
        if self._token is None and now < self._retry_token_at:
            return None
        self._token = None
        try:
            reply = self.endpoint.request("PUT", "/latest/api/token",
                                          {"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL_S)})
        except Unreachable:
            reply = None
        if reply is not None and reply.status == 200 and reply.body.strip():
            self._token = reply.body.strip().decode("ascii", "replace")
            self._token_until = now + AWS_TOKEN_TTL_S - AWS_TOKEN_MARGIN_S
            return self._token
        # No token (IMDSv2 unreachable, e.g. a hop limit of 1 from a container): try IMDSv1 meanwhile.
        self._retry_token_at = now + AWS_TOKEN_RETRY_S
        return None

    def check(self) -> str | None:
        token = self._current_token()
        headers = {"X-aws-ec2-metadata-token": token} if token else {}
        reply = self.endpoint.request("GET", "/latest/meta-data/spot/instance-action", headers)
        if reply.status == 404:
            return None
        if reply.status == 401:  # token expired or revoked: a new one at the next poll
            self._token, self._retry_token_at = None, 0.0
            raise Unreachable("HTTP 401 (token refused)")
        if reply.status != 200:
            raise Unreachable(f"HTTP {reply.status}")
        try:
            action = json.loads(reply.body)
            return f"EC2 spot instance-action {action['action']} at {action.get('time', '?')}"
        except (ValueError, TypeError, KeyError):
            return f"EC2 spot instance-action {_excerpt(reply.body)}"


class GcpProbe:
    what = "GCE instance/preempted"

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint

    def check(self) -> str | None:
        reply = self.endpoint.request("GET", "/computeMetadata/v1/instance/preempted", {"Metadata-Flavor": "Google"})
        if reply.status != 200:
            raise Unreachable(f"HTTP {reply.status}")
        value = reply.body.strip().upper()
        if value == b"TRUE":
            return "GCE instance/preempted is TRUE"
        if value == b"FALSE":
            return None
        raise Unreachable(f"unexpected answer {_excerpt(reply.body)}")


class AzureProbe:
    what = "Azure scheduled events (Preempt, Terminate)"

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint
        self._vm_name: str | None = None
        self._name_known = False

    def _this_vm(self) -> str | None:
        """This VM's compute name (what Resources lists); None when it cannot be read."""
        if not self._name_known:
            try:
                reply = self.endpoint.request("GET", "/metadata/instance/compute/name?api-version=2021-02-01"
                                                     "&format=text", {"Metadata": "true"})
            except Unreachable:
                return None  # asked again at the next event
            self._name_known = True
            self._vm_name = reply.body.strip().decode("utf-8", "replace") if reply.status == 200 else None
            if not self._vm_name:
                self._vm_name = None
                log.info("preemption notices: this VM's Azure compute name is unknown; "
                         "a Preempt or Terminate event for any VM counts")
        return self._vm_name

    def check(self) -> str | None:
        reply = self.endpoint.request("GET", f"/metadata/scheduledevents?api-version={AZURE_API_VERSION}",
                                      {"Metadata": "true"})
        if reply.status != 200:
            raise Unreachable(f"HTTP {reply.status}")
        try:
            events = json.loads(reply.body).get("Events") or []
        except (ValueError, AttributeError):
            raise Unreachable(f"unexpected answer {_excerpt(reply.body)}") from None
        relevant = [e for e in events if isinstance(e, dict) and e.get("EventType") in AZURE_NOTICE_EVENTS]
        if not relevant:
            return None
        vm = self._this_vm()
        for event in relevant:
            resources = event.get("Resources") or []
            if vm is None or not resources or vm in resources:
                return (f"Azure scheduled event {event['EventType']} ({event.get('EventStatus', '?')}, "
                        f"not before {event.get('NotBefore') or '?'})")
        return None


class UrlProbe:
    what = "notice URL"

    def __init__(self, endpoint: Endpoint, path: str):
        self.endpoint = endpoint
        self.path = path

    def check(self) -> str | None:
        reply = self.endpoint.request("GET", self.path)
        if reply.status in (404, 204) or (reply.status == 200 and not reply.body.strip()):
            return None
        if reply.status != 200:
            raise Unreachable(f"HTTP {reply.status}")
        return f"{self.endpoint.display}: {_excerpt(reply.body)}"


def _excerpt(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip().replace("\n", " ")
    return repr(text[:120] + ("..." if len(text) > 120 else ""))


def _probe(provider: str, url: str, timeout_s: float):
    if provider == "url":
        parts = urlsplit(url)
        base = f"{parts.scheme}://{parts.netloc}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return UrlProbe(Endpoint(base, timeout_s), path)
    return {"aws": AwsProbe, "gcp": GcpProbe, "azure": AzureProbe}[provider](Endpoint(url, timeout_s))


class NoticeWatcher:
    """Polls one notice source in a daemon thread; `seen` latches at the first notice."""

    def __init__(self, source: str, interval_s: float = 5.0, timeout_s: float = REQUEST_TIMEOUT_S):
        self.provider, url = parse_source(source)
        self.interval_s = interval_s
        self._probe = _probe(self.provider, url, timeout_s)
        self._display = display_url(url)
        self._seen = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._detail: str | None = None
        self._failing = False
        self._warned = False

    @classmethod
    def from_config(cls, train_cfg: "TrainConfig", local_rank: int = 0) -> "NoticeWatcher | None":
        """None when notices are off, and on all but local rank 0 (one poller per node is enough:
        the step-boundary vote carries the flag to every rank)."""
        if not train_cfg.preemption_notice or local_rank != 0:
            return None
        return cls(train_cfg.preemption_notice, train_cfg.notice_interval)

    @property
    def seen(self) -> bool:
        """A notice has appeared (latched). Never blocks on the network."""
        return self._seen.is_set()

    def describe(self) -> str:
        if self._seen.is_set():
            return f"preemption notice seen: {self._detail}"
        return (f"preemption notices: polling {self._probe.what} at {self._display} "
                f"every {self.interval_s:g}s")

    def start(self) -> "NoticeWatcher":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="preemption-notice", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Ends polling; returns at once even when a request is in flight (it ends by its timeout)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(STOP_JOIN_S)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.poll()
            if self._seen.is_set():
                return
            self._stopping.wait(self.interval_s)

    def poll(self) -> bool:
        """One request (or two: a token, a name); True when a notice has been seen."""
        if self._seen.is_set():
            return True
        try:
            detail = self._probe.check()
        except Unreachable as exc:
            self._note_unreachable(str(exc))
            return False
        except Exception:  # noqa: BLE001 - a bug here must not end the watcher silently, nor training
            log.exception("preemption notices: polling %s failed", self._display)
            return False
        if self._failing:
            self._failing = False
            log.info("preemption notices: %s answers again", self._display)
        if detail:
            self._detail = detail  # before the flag: whoever sees `seen` also sees the detail
            self._seen.set()
            log.warning("preemption notice: %s; a checkpoint follows at the next step boundary", detail)
        return self._seen.is_set()

    def _note_unreachable(self, reason: str) -> None:
        if self._failing:
            log.debug("preemption notices: %s still unreachable (%s)", self._display, reason)
            return
        self._failing = True
        level = logging.DEBUG if self._warned else logging.WARNING
        self._warned = True
        log.log(level, "preemption notices: %s unreachable (%s); counted as no notice, polling goes on",
                self._display, reason)


__all__ = ["NoticeWatcher", "check_source", "parse_source", "SOURCE_HELP"]
