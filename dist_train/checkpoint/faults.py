"""Faults of a remote store: which are worth another try, how to back off, how to say what went wrong.

Throttling (503 SlowDown), 5xx answers, connection resets and timeouts are transient:
`Storage` retries them with jittered exponential backoff within a bounded budget
(attempts and a deadline), on top of botocore's own per-request retries. Anything
else (4xx, a local disk error) is final at once. `describe_error` turns any of them
into one line for the user, never with credentials (botocore messages carry none).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Iterable

_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling",
                    "ThrottlingException", "RequestTimeTooSkewed", "ConditionalRequestConflict",
                    "500", "502", "503", "504"}


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter; at most `attempts` tries per operation, none after `deadline` seconds."""
    attempts: int = 6
    base_delay: float = 0.1
    max_delay: float = 4.0
    deadline: float = 120.0

    def delay(self, attempt: int) -> float:
        return min(self.max_delay, self.base_delay * 2 ** attempt) * (0.5 + random.random() / 2)


def error_chain(exc: BaseException) -> Iterable[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_transient(exc: BaseException) -> bool:
    """Worth another try: throttling, 5xx, resets and timeouts; never 4xx or local disk errors."""
    if isinstance(exc, FileExistsError):
        return False  # a conditional create that lost: an answer, not a fault
    for err in error_chain(exc):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return code in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500)
        name = type(err).__name__
        if name in ("ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError", "EndpointConnectionError",
                    "ServerDisconnectedError", "ClientOSError", "ClientPayloadError", "IncompleteRead",
                    "ResponseParserError", "FSTimeoutError"):
            return True
        if isinstance(err, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, TimeoutError,
                            asyncio.TimeoutError)):
            return True
    return False


def describe_error(exc: BaseException) -> str:
    """A one-line reason without credentials (botocore messages never carry secrets)."""
    tries = getattr(exc, "storage_attempts", None)
    suffix = f" (gave up after {tries} tries)" if tries and tries > 1 else ""
    for err in error_chain(exc):
        response = getattr(err, "response", None)
        if isinstance(response, dict) and response.get("Error"):
            error = response["Error"]
            return " ".join(f"{error.get('Code', 'error')}: {error.get('Message', '')}".split()) + suffix
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if isinstance(exc.filename, str) else ""
        return f"{exc.strerror}{where}{suffix}"
    return " ".join(f"{type(exc).__name__}: {exc}".split()) + suffix


def precondition_failed(exc: BaseException) -> bool:
    """S3 answered 412 to a conditional PUT: the object exists (stores differ in how they say it)."""
    if isinstance(exc, FileExistsError):
        return True
    for err in error_chain(exc):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return code == "PreconditionFailed" or status == 412
    return False
