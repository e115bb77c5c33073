"""Shared pytest setup: every test is marked by the folder it lives in; shared fixtures."""

import os
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

_FOLDER_MARKERS = {"unit", "distributed", "cluster", "e2e", "faults"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        folder = pathlib.Path(str(item.fspath)).parent.name
        if folder in _FOLDER_MARKERS:
            item.add_marker(getattr(pytest.mark, folder))


@pytest.fixture
def restore_environ():
    """``DistEnv.init()`` exports RANK/LOCAL_RANK/MASTER_PORT/... for DeepSpeed; tests that build
    one in this process use this to keep that out of later tests (``usefixtures``)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """The embedded dataset as shards (128 per shard: enough shards for 4 ranks), once per session."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from data_prep import prepare

    root = tmp_path_factory.mktemp("digits")
    prepare("digits", root, shard_size=128, progress=False)
    return root
