"""Shared pytest fixtures. Data-stage fixtures live in tests/fixtures/ and are wired in here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:  # `tests.fixtures` importable however pytest is started
    sys.path.insert(0, _REPO_ROOT)

from benchmarks.celeba_layout import CelebaFixture, write_celeba_fixture  # noqa: E402
from tests.fixtures.http_server import FileServer  # noqa: E402
from tests.fixtures.s3 import s3_server as start_s3_server  # noqa: E402


@pytest.fixture(scope="session")
def celeba_fixture(tmp_path_factory: pytest.TempPathFactory) -> CelebaFixture:
    """30 real 178x218 JPEGs in torchvision's CelebA layout (zip, extracted folder, five .txt files), split
    20/5/5. Shared by the session: treat it as read-only."""
    return write_celeba_fixture(tmp_path_factory.mktemp("celeba-fixture"), (20, 5, 5), seed=0, extract=True)


@pytest.fixture
def http_server(monkeypatch: pytest.MonkeyPatch):
    """A local HTTP server on 127.0.0.1 (see tests/fixtures/http_server.py), stopped after the test."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    with FileServer() as server:
        yield server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 endpoint on 127.0.0.1 (moto's server, signatures checked, objects on disk;
    tests/fixtures/s3.py) for the session; each test takes its own prefix (``s3_server.prefix()``)."""
    with start_s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def s3(s3_server, monkeypatch: pytest.MonkeyPatch):
    """``s3_server`` with its endpoint and credentials in the standard AWS environment variables."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server
