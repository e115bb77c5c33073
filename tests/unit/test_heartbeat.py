"""Heartbeats: the diagnosis names the rank that went silent, not the ones waiting for it."""

from __future__ import annotations

import json
import time

from pce_dist.distributed.heartbeat import Heartbeat, diagnose, read_heartbeats


def _write(d, rank, *, age, step, phase="train", pid=100):
    d.mkdir(parents=True, exist_ok=True)
    (d / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "pid": pid + rank, "host": "h", "step": step,
                                                    "phase": phase, "written_at": time.time() - age,
                                                    "progress_at": time.time() - age}))


def test_silent_rank_is_named_even_when_others_are_behind_it(tmp_path):
    _write(tmp_path, 0, age=0.5, step=20)
    _write(tmp_path, 1, age=40, step=22)  # frozen after reaching step 22
    _write(tmp_path, 2, age=0.5, step=21)
    why = diagnose(tmp_path, 3, stale_after_s=10)
    assert why.startswith("rank 1 (pid 101 on h) stopped responding: no heartbeat for 40 s") and "step 22" in why
    assert "rank 0" not in why and "rank 2" not in why


def test_without_a_silent_rank_the_one_behind_is_named(tmp_path):
    _write(tmp_path, 0, age=0.5, step=20)
    _write(tmp_path, 1, age=0.5, step=19)
    assert diagnose(tmp_path, 2, stale_after_s=10) == "rank(s) 1 are behind at step 19 (others reached step 20)"
    _write(tmp_path, 1, age=0.5, step=20)
    assert diagnose(tmp_path, 2, stale_after_s=10) is None


def test_exited_ranks_and_old_attempts_are_not_blamed(tmp_path):
    _write(tmp_path, 0, age=0.5, step=5)
    _write(tmp_path, 1, age=100, step=5, phase="exited")
    assert diagnose(tmp_path, 2, stale_after_s=10) is None
    assert set(read_heartbeats(tmp_path, 2, since=time.time() - 10)) == {0}
    assert diagnose(tmp_path, 2, stale_after_s=10, exclude=1) is None


def test_writer_thread_rewrites_the_file_and_beat_records_progress(tmp_path):
    hb = Heartbeat(tmp_path, rank=3, interval_s=0.05).start()
    try:
        hb.beat(7, "train")
        time.sleep(0.3)
        beat = read_heartbeats(tmp_path, 4)[3]
        assert beat.step == 7 and beat.phase == "train" and time.time() - beat.written_at < 0.3
    finally:
        hb.close()
    assert read_heartbeats(tmp_path, 4)[3].phase == "exited"
