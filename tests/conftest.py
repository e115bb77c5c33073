"""Shared pytest setup: every test is marked by the folder it lives in."""

import pathlib

import pytest

_FOLDER_MARKERS = {"unit", "distributed", "cluster", "e2e"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        folder = pathlib.Path(str(item.fspath)).parent.name
        if folder in _FOLDER_MARKERS:
            item.add_marker(getattr(pytest.mark, folder))
