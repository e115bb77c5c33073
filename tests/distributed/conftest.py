"""Fixtures for tests/distributed. The process harness itself is ``multiproc.spawn``."""

import os

import pytest


@pytest.fixture(autouse=True)
def _restore_environ():
    """``DistEnv.init()`` exports RANK/MASTER_PORT/... for DeepSpeed; keep that out of later tests."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
