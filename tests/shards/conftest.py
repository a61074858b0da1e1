"""Fixtures of the shard tests: a real S3-compatible server on the loopback (started once, only when asked for)."""

from __future__ import annotations

import os

import pytest

from tests.shards.s3_server import start_s3_server


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 with a bucket ``data``; stopped at the end of the session."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    server = start_s3_server()
    try:
        server.client().create_bucket(Bucket="data")
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This process's AWS_* environment pointing at the test server (fsspec's cached clients dropped around it)."""
    import s3fs

    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_server
    s3fs.S3FileSystem.clear_instance_cache()
