"""A run directory that was copied or moved keeps its MLflow artifacts inside itself.

Why this exists: MLflow's sqlite store records *absolute* artifact locations -- the
experiment's ``artifact_location`` (``file:///<run_dir>/mlartifacts``, chosen by
``opening._experiment_id``) and, copied from it when a run is created, each run's
``artifact_uri``. A run directory resumed from a new place would otherwise upload its
``config.yaml`` and plots to the old path: into the original (a copy writes outside
itself), or, when that is gone, into a re-created empty tree there.

What is rewritten, and only when the store is a sqlite file *inside* the run directory
(the default; a store the user points at is theirs and left alone): every experiment
location that is a ``file:`` URI of a directory named ``mlartifacts`` other than this
directory's, and the runs under it, prefix for prefix. Artifacts already uploaded stay
where they are in the copy (``mlartifacts/<run id>/artifacts/...``), so the rewritten
URIs find them again. MLflow has no API to change an artifact location, hence plain SQL
on its two columns (``experiments.artifact_location``, ``runs.artifact_uri``; stable
across MLflow 1.x-3.x, and the relocation test fails if that ever changes).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from pce_dist.tracking.client import log

ARTIFACTS_DIR = "mlartifacts"  # <run_dir>/mlartifacts: the local store's artifact root
_SQLITE = "sqlite:///"


def own_sqlite_file(uri: str, run_dir: Path) -> Path | None:
    """The sqlite file of ``uri`` when it lies inside ``run_dir`` (and exists), else None."""
    if not uri.startswith(_SQLITE):
        return None
    db = Path(uri[len(_SQLITE):].split("?", 1)[0])
    if not db.is_file():
        return None
    try:
        db.resolve().relative_to(run_dir.resolve())
    except ValueError:
        return None
    return db


def follow_run_dir(uri: str, run_dir: Path) -> list[str]:
    """Point the run directory's own store at ``<run_dir>/mlartifacts``; returns the old locations moved.

    A no-op (empty list) for a store outside ``run_dir``, a new store, or one already in place.
    """
    db = own_sqlite_file(uri, run_dir)
    if db is None:
        return []
    here = (run_dir.resolve() / ARTIFACTS_DIR).as_uri()
    moved: list[str] = []
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT experiment_id, artifact_location FROM experiments").fetchall()
        for experiment_id, location in rows:
            old = (location or "").rstrip("/")
            if not old.startswith("file:") or old == here or not old.endswith("/" + ARTIFACTS_DIR):
                continue
            con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (here, experiment_id))
            con.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                        "WHERE experiment_id = ? AND substr(artifact_uri, 1, ?) = ?",
                        (here, len(old) + 1, experiment_id, len(old) + 1, old + "/"))
            moved.append(old)
    con.close()
    for old in moved:
        log.warning("tracking: this run directory was moved or copied; MLflow artifacts that went to %s now go to %s",
                    old, here)
    return moved
