"""A real S3-compatible server for tests: moto's server in a subprocess on 127.0.0.1, with IAM-checked credentials.

The server runs in its own process, not in a thread of the test process: DALI's S3 client (C++) would otherwise
wait on a server thread that needs the GIL its caller holds. Credentials are checked (moto's
``INITIAL_NO_AUTH_ACTION_COUNT``: the first requests, which create the IAM user and its key, go unchecked), so
a wrong secret is refused as a real store refuses it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from distributed import free_port

_SETUP_REQUESTS = 3  # create_user, put_user_policy, create_access_key: made before credentials are enforced


@dataclass
class S3Server:
    """A running server: its endpoint and the environment that points boto3, s3fs and DALI at it."""

    endpoint: str
    key: str
    secret: str
    process: subprocess.Popen

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret)

    @contextlib.contextmanager
    def recording(self) -> Iterator[Callable[[], list[tuple[str, str, str]]]]:
        """Record the requests the server receives; yields a call returning them so far as (method, path, range).

        moto's request recorder (``/moto-api/recorder/``) appends each request to a log file; the path is the
        URL path and query (``/data/shards/train-000000.tar``), the range the ``Range`` header ('' for none).
        """
        def call(action: str) -> bytes:
            request = urllib.request.Request(f"{self.endpoint}/moto-api/recorder/{action}", method="POST", data=b"")
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.read()

        def requests() -> list[tuple[str, str, str]]:
            lines = call("download-recording").decode().splitlines()
            out = []
            for line in lines:
                entry = json.loads(line)
                headers = {k.lower(): v for k, v in entry["headers"].items()}
                path = entry["url"].split("://", 1)[-1].split("/", 1)[-1]
                out.append((entry["method"], "/" + path, headers.get("range", "")))
            return out

        call("reset-recording")
        call("start-recording")
        try:
            yield requests
        finally:
            call("stop-recording")
            call("reset-recording")

    def stop(self) -> None:
        port = self.endpoint.rsplit(":", 1)[1]
        Path(tempfile.gettempdir(), f"moto-requests-{port}.jsonl").unlink(missing_ok=True)
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_s3_server(timeout: float = 60) -> S3Server:
    """Start moto's S3 server on a free loopback port and create a user allowed everything on S3."""
    import boto3

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(_SETUP_REQUESTS)
    env["MOTO_RECORDER_FILEPATH"] = str(Path(tempfile.gettempdir()) / f"moto-requests-{port}.jsonl")  # see recording
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"moto server did not start on 127.0.0.1:{port}") from None
            time.sleep(0.05)
    endpoint = f"http://127.0.0.1:{port}"
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                       aws_secret_access_key="setup")
    iam.create_user(UserName="trainer")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    return S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"], process)
