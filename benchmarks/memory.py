"""Resident memory of every rank over a long training run: does it stay flat?

    python benchmarks/memory.py [--config configs/digits.yaml] [--epochs 40] [--json] [key=value ...]
    python benchmarks/memory.py --env MALLOC_ARENA_MAX=2      # same run, an allocator experiment

Runs ``launch/local.py --nproc N`` (digits, ``dist.ep_size=N``, evaluation, plots and a
checkpoint after every epoch: the per-epoch and per-evaluation work is what repeats in a
long run) and samples, every ``--interval`` seconds and at every evaluation, the RSS of
each rank's own process and, separately, the summed RSS of its descendants (the loader
workers of the epoch in progress; forked, so that sum counts pages shared with the rank
again -- it shows worker churn, not extra memory).

The reference point is each rank's RSS when rank 0 logs the evaluation of epoch
``--warmup`` (default 2: the evaluation of epoch 1 is the first to draw plots -- importing
matplotlib -- and is followed by the first checkpoint, so one-off set-up is done by the
second); "end" is the same point of the last epoch, so both are taken at the same place
in the loop. Growth per epoch is ``(end - start) / epochs between``: a flat pipeline
reads ~0. The training img/s is read from rank 0's progress bar (median after the
reference point), so an allocator experiment shows its cost next to its effect.

What the larger dataset shows (the digits model is small, so its heap settles sooner):

    python benchmarks/memory.py --config configs/fashion_mnist.yaml --epochs 14 \
        'data.train_shards=train-{000000..000003}.tar'   # short epochs, val every epoch
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
MB = 1024 * 1024
# Rank 0's line after each evaluation (pce_dist.trainer.Trainer.evaluate).
_EVAL_LINE = re.compile(rb"(\w+) at epoch (\d+)/(\d+) \(step (\d+)\)")
_IMG_S = re.compile(rb"epoch (\d+):.*img_s=(\d+)")  # the progress bar's postfix, per log interval


class _Sampler:
    """RSS of the rank processes (children of the launcher) and of their descendants."""

    def __init__(self, launcher: psutil.Process) -> None:
        self.launcher = launcher
        self.samples: list[dict] = []  # {"t", "epoch", "ranks": {rank: [rss_mb, workers_mb, num_workers]}}
        self.marks: dict[int, int] = {}  # epoch -> index into samples (the sample taken at its evaluation)
        self.img_per_s: dict[int, list[int]] = {}  # epoch -> distinct img/s readings of rank 0's bar
        self.epoch = 0
        self.lock = threading.Lock()
        self.t0 = time.monotonic()

    def _ranks(self) -> dict[int, psutil.Process]:
        out = {}
        for p in self.launcher.children():
            try:
                out[int(p.environ().get("RANK", -1))] = p
            except (psutil.Error, ValueError):
                continue
        return {r: p for r, p in out.items() if r >= 0}

    def sample(self, mark_epoch: int | None = None) -> None:
        ranks = {}
        for rank, proc in sorted(self._ranks().items()):
            try:
                rss = proc.memory_info().rss
                workers = [c.memory_info().rss for c in proc.children(recursive=True)]
            except psutil.Error:
                continue
            ranks[rank] = [rss / MB, sum(workers) / MB, len(workers)]
        if not ranks:
            return
        with self.lock:
            if mark_epoch is not None:
                self.epoch = mark_epoch
                self.marks.setdefault(mark_epoch, len(self.samples))
            self.samples.append({"t": round(time.monotonic() - self.t0, 2), "epoch": self.epoch, "ranks": ranks})


def _read_output(stream, sampler: _Sampler, tail: list[bytes]) -> None:
    """Follow rank 0's output (through the launcher): sample at each evaluation line."""
    buf = b""
    for chunk in iter(lambda: stream.read1(65536), b""):
        buf += chunk
        *lines, buf = re.split(rb"[\r\n]", buf)
        for line in lines:
            match = _EVAL_LINE.search(line)
            if match:
                sampler.sample(mark_epoch=int(match.group(2)))
            rate = _IMG_S.search(line)
            if rate:
                readings = sampler.img_per_s.setdefault(int(rate.group(1)), [])
                if not readings or readings[-1] != int(rate.group(2)):
                    readings.append(int(rate.group(2)))
            if line.strip():
                tail.append(line)
                del tail[:-40]


def measure(args: argparse.Namespace, output_dir: Path) -> dict:
    overrides = [f"train.epochs={args.epochs}", "train.eval_every_epochs=1", f"dist.ep_size={args.nproc}",
                 *args.overrides]
    cmd = [sys.executable, str(REPO / "launch" / "local.py"), "--nproc", str(args.nproc), "--config", args.config,
           "--output-dir", str(output_dir), *overrides]
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    env.update(kv.split("=", 1) for kv in args.env)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    sampler, tail = _Sampler(psutil.Process(proc.pid)), []
    reader = threading.Thread(target=_read_output, args=(proc.stdout, sampler, tail), daemon=True)
    reader.start()
    while proc.poll() is None:
        sampler.sample()
        time.sleep(args.interval)
    reader.join(10)
    if proc.returncode != 0:
        sys.stderr.write(b"\n".join(tail).decode(errors="replace") + "\n")
        raise SystemExit(f"benchmarks/memory.py: the training run exited with code {proc.returncode}: {' '.join(cmd)}")
    return {"command": cmd, "env": args.env, "wall_s": time.perf_counter() - start,
            **summarise(sampler.samples, sampler.marks, args.warmup),
            "img_per_s_median": _median([v for e, vs in sampler.img_per_s.items() if e >= args.warmup for v in vs])}


def _median(values: list[int]) -> float | None:
    return statistics.median(values) if values else None


def summarise(samples: list[dict], marks: dict[int, int], warmup: int) -> dict:
    """Per rank: RSS at the evaluation of epoch ``warmup`` and of the last epoch, growth, peak."""
    epochs = sorted(marks)
    if len(epochs) < 2 or warmup not in marks or warmup == epochs[-1]:
        raise SystemExit(f"benchmarks/memory.py: evaluations seen at epochs {epochs}; need epoch {warmup} "
                         "and a later one (raise --epochs)")
    first, last = marks[warmup], marks[epochs[-1]]
    ranks = sorted(samples[first]["ranks"])
    per_rank = {}
    for r in ranks:
        start, end = samples[first]["ranks"][r][0], samples[last]["ranks"][r][0]

        def peak_workers(lo: int, hi: int) -> float:  # summed worker RSS, peak over samples[lo:hi]
            return max((s["ranks"][r][1] for s in samples[lo:hi] if r in s["ranks"]), default=0.0)

        def peak_rss(lo: int, hi: int) -> float:
            return max((s["ranks"][r][0] for s in samples[lo:hi] if r in s["ranks"]), default=0.0)

        # The first measured epoch and the last one, mark to mark: a peak is less sensitive to
        # where in a heap's short-lived swings a single mark falls.
        next_mark = marks.get(warmup + 1, last)
        prev_mark = marks.get(epochs[-1] - 1, first)
        per_rank[r] = {
            "rss_start_mb": round(start, 1), "rss_end_mb": round(end, 1), "growth_mb": round(end - start, 1),
            "growth_mb_per_epoch": round((end - start) / (epochs[-1] - warmup), 2),
            "rss_peak_mb_start": round(peak_rss(first, next_mark + 1), 1),
            "rss_peak_mb_end": round(peak_rss(prev_mark, last + 1), 1),
            "workers_peak_mb_start": round(peak_workers(first, next_mark + 1), 1),
            "workers_peak_mb_end": round(peak_workers(prev_mark, last + 1), 1),
        }
    return {"warmup_epoch": warmup, "last_epoch": epochs[-1], "epochs_measured": epochs[-1] - warmup,
            "seconds_measured": samples[last]["t"] - samples[first]["t"], "ranks": per_rank,
            "samples": [{"t": s["t"], "epoch": s["epoch"], "rss_mb": {r: round(v[0], 1) for r, v in s["ranks"].items()}}
                        for s in samples]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=2, help="epoch whose evaluation is the reference point")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between RSS samples")
    ap.add_argument("--output-dir", default=None, help="run directory (default: a temporary one, removed)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment variable for the run (MALLOC_ARENA_MAX=2, ...); repeatable")
    ap.add_argument("--small", action="store_true", help="a few epochs (CI: the script cannot rot)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    if args.small:
        args.epochs = min(args.epochs, 4)
    if args.output_dir:
        if Path(args.output_dir).exists() and any(Path(args.output_dir).iterdir()):
            ap.error(f"--output-dir {args.output_dir} is not empty: the run would resume there, not train")
        result = measure(args, Path(args.output_dir))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = measure(args, Path(tmp) / "run")
    result.update(config=args.config, nproc=args.nproc, overrides=args.overrides)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.config}, {args.nproc} ranks, {' '.join(args.overrides + args.env) or 'no overrides'}: "
              f"RSS at the evaluation of epoch {result['warmup_epoch']} and of epoch {result['last_epoch']} "
              f"({result['seconds_measured']:.0f} s apart); training {result['img_per_s_median'] or 0:.0f} img/s "
              "(rank 0's progress bar, median after the reference point)")
        print("| rank | RSS start MB | RSS end MB | growth MB | MB / epoch | peak MB, first / last epoch | "
              "workers (summed) peak MB, first / last epoch |")
        print("|---|---|---|---|---|---|---|")
        for r, v in result["ranks"].items():
            print(f"| {r} | {v['rss_start_mb']:.0f} | {v['rss_end_mb']:.0f} | {v['growth_mb']:+.1f} | "
                  f"{v['growth_mb_per_epoch']:+.2f} | {v['rss_peak_mb_start']:.0f} / {v['rss_peak_mb_end']:.0f} | "
                  f"{v['workers_peak_mb_start']:.0f} / {v['workers_peak_mb_end']:.0f} |")
    return result


if __name__ == "__main__":
    main()
