"""Compare runs side by side: ``python -m pce_dist.compare``.

    python -m pce_dist.compare --run-dir runs/e4 --run-dir runs/e8
    python -m pce_dist.compare --tracking-uri http://host:5000 --experiment pce_dist --sort eval/accuracy
    python -m pce_dist.compare --run-dir runs/* --metrics router/val/layer0/entropy --csv -

One row per run: name, short id, status, wall time, the params whose values differ
between the listed runs (a param equal everywhere says nothing about why two runs
differ, so it is left out), then ``best`` and ``final`` values of the headline metrics
that any run has (``eval/accuracy``, ``eval/loss``, ``val/accuracy``, ``perf/img_per_s``)
plus ``--metrics`` extras. ``best`` is the max for accuracy-like and the min for
loss-like names (``metrics.metric_goal``); ``final`` is the value at the last step.
Metric names are those of ``pce_dist.metrics`` (its docstring lists the schema).

Each run directory has its own sqlite store by default, so ``--run-dir`` (repeatable,
several directories per flag) reads ``<dir>/mlflow.db``; runs from several stores and a
``--tracking-uri`` end up in one table, with a ``source`` column. Reading goes through
``pce_dist.runs`` (MLflow's reading side) and never creates a store.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from .metrics import SUMMARY_METRICS, is_compared_specialisation, metric_goal
from .redact import redact
from .runs import fetch_runs, run_dir_store_uri

_FIXED = ("run", "id", "source", "status", "wall_s")


def build_table(runs: Sequence[dict[str, Any]], extra_metrics: Sequence[str] = (),
                show_source: bool = False) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and raw rows (``None`` where a run lacks a value) from ``fetch_runs`` summaries.

    Runs carry a ``source`` key (the store they came from) when ``show_source`` is set.
    """
    param_keys = sorted({k for r in runs for k in r["params"]})
    differing = [k for k in param_keys if len({r["params"].get(k) for r in runs}) > 1]
    metric_keys = [k for k in SUMMARY_METRICS if any(k in r["metrics"] for r in runs)]
    # per layer: does it balance, and does it route by content or by place (final values)
    metric_keys += sorted({k for r in runs for k in r["metrics"] if is_compared_specialisation(k)})
    metric_keys += [k for k in extra_metrics if k not in metric_keys]
    metric_cols = []
    for key in metric_keys:
        if metric_goal(key) is not None:
            metric_cols.append(f"{key}:best")
        metric_cols.append(f"{key}:final")
    columns = [c for c in _FIXED if c != "source" or show_source] + differing + metric_cols
    rows = []
    for r in runs:
        row: dict[str, Any] = {"run": r["run_name"], "id": r["run_id"][:8], "source": r.get("source"),
                               "status": r["status"], "wall_s": r["wall_time_s"]}
        row.update({k: r["params"].get(k) for k in differing})
        for key in metric_keys:
            row[f"{key}:best"] = r["best"].get(key)
            row[f"{key}:final"] = r["metrics"].get(key)
        rows.append({c: row.get(c) for c in columns})
    return columns, rows


def resolve_sort_column(columns: Sequence[str], key: str) -> str:
    """A column name, or a metric name standing for its ``:best`` (else ``:final``) column."""
    if key == "wall":  # the text table's header for wall_s
        key = "wall_s"
    for candidate in (key, f"{key}:best", f"{key}:final"):
        if candidate in columns:
            return candidate
    raise ValueError(f"cannot sort by {key!r}: not a column of this table ({', '.join(columns)})")


def sort_rows(rows: list[dict[str, Any]], column: str) -> list[dict[str, Any]]:
    """Best first for metrics with a goal (descending for accuracy-like), else ascending; blanks last."""
    metric = column.rsplit(":", 1)[0] if column.endswith((":best", ":final")) else None
    descending = metric is not None and metric_goal(metric) == "max"

    def key(row: dict[str, Any]) -> tuple:
        value = row[column]
        if value is None or value == "":
            return (1, 0, "")
        try:
            number = float(value)
            return (0, 0, -number if descending else number)
        except (TypeError, ValueError):
            return (0, 1, str(value))  # numbers before strings in a mixed param column

    return sorted(rows, key=key)


def _format_cell(column: str, value: Any) -> str:
    if value is None or value == "":
        return "-"
    if column == "wall_s":
        seconds = int(round(float(value)))
        return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4f}"
    return str(value)


def render_text(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """Fixed-width table: text left-aligned, numbers right-aligned, ``-`` for missing."""
    headers = ["wall" if c == "wall_s" else c for c in columns]
    cells = [[_format_cell(c, row[c]) for c in columns] for row in rows]
    numeric = [all(isinstance(row[c], (int, float)) or row[c] is None for row in rows) for c in columns]
    widths = [max([len(h)] + [len(line[i]) for line in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(c) for c in cells]) + "\n"


def write_csv(columns: Sequence[str], rows: Sequence[dict[str, Any]], stream: TextIO) -> None:
    """Raw values (full precision, seconds for ``wall_s``), empty where missing."""
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row[c] is None else row[c] for c in columns])


def _sources(run_dirs: Sequence[str], tracking_uri: str | None) -> list[tuple[str, str]]:
    """``(label, uri)`` per store to read; the environment's URI only when nothing was named."""
    sources = [(d, run_dir_store_uri(d)) for d in run_dirs]
    if tracking_uri:
        sources.append((redact(tracking_uri), tracking_uri))
    if not sources and os.environ.get("MLFLOW_TRACKING_URI"):
        uri = os.environ["MLFLOW_TRACKING_URI"]
        sources.append((redact(uri), uri))
    if not sources:
        raise ValueError("nothing to compare: pass --run-dir DIR (repeatable) or --tracking-uri URI "
                         "(or set MLFLOW_TRACKING_URI)")
    return sources


def collect(sources: Sequence[tuple[str, str]], experiment: str | None,
            extra_metrics: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Runs of every source, each run once (two run dirs may share one server)."""
    best_keys = list(dict.fromkeys([*SUMMARY_METRICS, *extra_metrics]))
    runs: dict[str, dict[str, Any]] = {}
    for label, uri in sources:
        found = fetch_runs(uri, experiment, best_keys=best_keys)
        if not found and len(sources) > 1:
            print(f"compare: note: no runs at {label}", file=sys.stderr)
        for run in found:
            runs.setdefault(run["run_id"], {**run, "source": label})
    if not runs:
        where = ", ".join(label for label, _ in sources)
        scope = f"experiment {experiment!r}" if experiment else "any experiment"
        raise ValueError(f"no runs in {scope} at {where}")
    return list(runs.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pce_dist.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default=None, help="experiment name (default: every experiment in the store)")
    ap.add_argument("--tracking-uri", default=None, help="an MLflow tracking URI (server or database)")
    ap.add_argument("--run-dir", action="extend", nargs="+", default=[], metavar="DIR",
                    help="run directories whose mlflow.db to read (repeatable; several per flag)")
    ap.add_argument("--sort", default=None, metavar="METRIC",
                    help="column or metric to sort by; best first for accuracy/loss-like metrics "
                         "(default: start time)")
    ap.add_argument("--metrics", default="", help="extra metrics, comma-separated (best and final)")
    ap.add_argument("--csv", default=None, metavar="PATH", help="write CSV to PATH ('-': stdout, instead of the table)")
    args = ap.parse_args(argv)
    extras = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if args.sort and "/" in args.sort and ":" not in args.sort and args.sort not in extras:
        extras.append(args.sort)  # a metric to sort by is shown, even if not a headline one
    try:
        sources = _sources(args.run_dir, args.tracking_uri)
        runs = collect(sources, args.experiment, extras)
        columns, rows = build_table(runs, extras, show_source=len(sources) > 1)
        if args.sort:
            rows = sort_rows(rows, resolve_sort_column(columns, args.sort))
        if args.csv == "-":
            write_csv(columns, rows, sys.stdout)
            return 0
        if args.csv:
            with open(args.csv, "w", newline="") as f:
                write_csv(columns, rows, f)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(render_text(columns, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
