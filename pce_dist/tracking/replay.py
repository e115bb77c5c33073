"""``python -m pce_dist.tracking replay RUN_DIR``: send what a run's fallback file still holds.

For records a process left behind when it ended while the store was down (the writer
tells the user to run this). It sends through ``delivery.replay_pending``, the same
function the writer thread uses, under the file's exclusive lock, so a live writer waits
its turn and rerunning the command sends nothing twice.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pce_dist.redact import MASK, redact, secret_values
from pce_dist.tracking.client import log, watch_secrets
from pce_dist.tracking.delivery import replay_pending
from pce_dist.tracking.fallback import FALLBACK_FILE, Contents, FallbackFile


def replay_run_dir(run_dir: str | Path, tracking_uri: str | None = None) -> tuple[int, bool]:
    """Send every undelivered record of ``run_dir``'s fallback file; returns (records sent, all sent).

    The URI: ``tracking_uri`` > ``MLFLOW_TRACKING_URI`` > the one each session recorded
    (unless it hides a credential). Holds the file's lock, so a live writer waits its turn.
    """
    from mlflow import MlflowClient

    fallback = FallbackFile(Path(run_dir) / FALLBACK_FILE)
    live = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    watch_secrets(secret_values(live or ""))
    total, complete = 0, True
    with fallback.exclusive(wait=True):
        contents = fallback.read()
        for run_id in dict.fromkeys(p.entry["run_id"] for p in contents.pending):
            uri = live or _recorded_uri(contents, run_id)
            if uri is None:
                log.error("tracking: run %s: the tracking URI recorded in %s hides a credential; pass "
                          "--tracking-uri or set MLFLOW_TRACKING_URI", run_id, fallback.path)
                complete = False
                continue
            outcome = replay_pending(MlflowClient(tracking_uri=uri), fallback, run_id, own_sid=None)
            total += outcome.sent
            print(redact(f"run {run_id} at {uri}: sent {outcome.sent}, {outcome.left} left"
                         + (f" (the store did not answer: {outcome.error})" if outcome.error else "")), flush=True)
            complete = complete and outcome.error is None
    return total, complete


def _recorded_uri(contents: Contents, run_id: str) -> str | None:
    """The URI of the run's latest session that recorded one, unless it is masked."""
    recorded = [line["tracking_uri"] for _, line in contents.sessions_of(run_id) if line.get("tracking_uri")]
    uri = recorded[-1] if recorded else None
    return None if uri is None or MASK in uri else uri


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pce_dist.tracking",
                                 description="Tracking maintenance. replay: send the metrics, artifacts and final "
                                             "status a run directory's metrics_fallback.jsonl still holds "
                                             "(each record once; rerunning sends nothing twice).")
    sub = ap.add_subparsers(dest="command", required=True)
    rp = sub.add_parser("replay", help="send what RUN_DIR's fallback file still holds to its MLflow run")
    rp.add_argument("run_dir", metavar="RUN_DIR")
    rp.add_argument("--tracking-uri", default=None,
                    help="the store to send to (default: MLFLOW_TRACKING_URI, else the URI the run recorded)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not Path(args.run_dir).is_dir():
        print(f"error: {args.run_dir} is not a directory", file=sys.stderr)
        return 2
    sent, complete = replay_run_dir(args.run_dir, args.tracking_uri)
    print(f"sent {sent} records", flush=True)
    return 0 if complete else 1
