"""The ``spawn`` harness itself: failures and hangs surface quickly, with the rank and the cause."""

from __future__ import annotations

import os
import time

import pytest
from multiproc import RankFailed, RankTimeout, spawn


def _echo(rank: int, world_size: int, tag: str) -> tuple:
    return rank, world_size, tag, os.environ["RANK"], os.environ["WORLD_SIZE"]


def _raises_on_rank1(rank: int, world_size: int) -> None:
    if rank == 1:
        raise KeyError("boom on rank 1")
    time.sleep(30)  # would stall the test if the harness waited for it


def _dies_silently(rank: int, world_size: int) -> None:
    if rank == 0:
        os._exit(3)  # no traceback, no message: only the exit code tells
    time.sleep(30)


def _hangs(rank: int, world_size: int) -> None:
    time.sleep(30)


def test_results_come_back_by_rank():
    assert spawn(_echo, 3, args=("t",)) == [(r, 3, "t", str(r), "3") for r in range(3)]


def test_a_raising_rank_fails_fast_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(RankFailed, match="rank 1 failed: KeyError") as info:
        spawn(_raises_on_rank1, 2, timeout_s=60)
    assert "boom on rank 1" in info.value.tb and "_raises_on_rank1" in info.value.tb
    assert time.monotonic() - start < 15


def test_a_rank_dying_without_a_word_is_reported_with_its_exit_code():
    with pytest.raises(RankFailed, match="rank 0 failed: process exited with code 3") as info:
        spawn(_dies_silently, 2, timeout_s=60)
    assert info.value.exitcode == 3


def test_hung_ranks_are_killed_at_the_deadline(capfd):
    start = time.monotonic()
    with pytest.raises(RankTimeout, match=r"ranks \[0, 1\] did not finish within 3 s"):
        spawn(_hangs, 2, timeout_s=3)
    assert time.monotonic() - start < 10
