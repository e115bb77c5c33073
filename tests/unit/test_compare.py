"""``python -m pce_dist.compare`` against real sqlite MLflow stores (no mocks).

Creating a sqlite store runs MLflow's migrations (~5-10 s here), so one store is built
per module and copied for the second run directory instead of being created again.
"""

from __future__ import annotations

import csv
import io
import shutil

import pytest

from pce_dist import compare
from pce_dist.metrics import metric_goal
from pce_dist.runs import fetch_runs

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")  # inside MLflow

_T0 = 1_700_000_000_000  # ms; fixed so wall times are exact
_SHARED = {"model.channels": "[8, 8]", "data.batch_size": "64", "optim.lr": "0.002"}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Run dir ``a`` (runs e4, e8 in experiment pce_test) and ``b`` (a copy plus a RUNNING run e16)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    root = tmp_path_factory.mktemp("compare")
    dir_a, dir_b = root / "a", root / "b"
    dir_a.mkdir()
    client = MlflowClient(f"sqlite:///{dir_a / 'mlflow.db'}")
    exp = client.create_experiment("pce_test", artifact_location=(root / "art").as_uri())
    client.create_experiment("empty", artifact_location=(root / "art").as_uri())

    def make_run(c, name, experts, acc, loss, img_s, end_s=None):
        run = c.create_run(exp, run_name=name, start_time=_T0)
        rid = run.info.run_id
        params = {**_SHARED, "model.num_experts": str(experts)}
        metrics = [Metric(key, value, _T0 + 1000 * step, step)
                   for key, series in (("eval/accuracy", acc), ("eval/loss", loss), ("perf/img_per_s", img_s),
                                       ("train/loss", loss), ("router/val/layer0/entropy", [0.5, 0.4, 0.3]))
                   for step, value in zip((10, 20, 30), series)]
        c.log_batch(rid, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
        if end_s is not None:
            c.set_terminated(rid, end_time=_T0 + 1000 * end_s)
        return rid

    # e4 peaks early (best 0.9, final 0.5); e8 is steadier (best 0.8, final 0.78).
    make_run(client, "e4", 4, [0.6, 0.9, 0.5], [0.9, 0.4, 1.2], [900.0, 1100.0, 1000.0], end_s=3723)
    make_run(client, "e8", 8, [0.7, 0.8, 0.78], [0.8, 0.5, 0.45], [800.0, 850.0, 820.0], end_s=60)
    shutil.copytree(dir_a, dir_b)
    copy = MlflowClient(f"sqlite:///{dir_b / 'mlflow.db'}")
    for run in copy.search_runs([exp]):
        copy.delete_run(run.info.run_id)
    make_run(copy, "e16", 16, [0.1, 0.2, 0.3], [2.0, 1.9, 1.8], [500.0, 500.0, 500.0], end_s=None)
    yield dir_a, dir_b
    mp.undo()


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = compare.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _csv(capsys, *argv: str) -> list[dict[str, str]]:
    rc, out, err = _run(capsys, *argv, "--csv", "-")
    assert rc == 0, err
    return list(csv.DictReader(io.StringIO(out)))


def test_table_shows_only_differing_params_and_present_metrics(stores, capsys):
    rc, out, err = _run(capsys, "--run-dir", str(stores[0]), "--experiment", "pce_test")
    assert rc == 0, err
    header, rule, *rows = out.splitlines()
    assert set(rule) <= {"-", " "}
    columns = header.split()
    assert columns[:4] == ["run", "id", "status", "wall"]
    assert "model.num_experts" in columns
    assert not {"data.batch_size", "model.channels", "optim.lr"} & set(columns)  # equal in both runs
    assert {"eval/accuracy:best", "eval/accuracy:final", "eval/loss:best", "perf/img_per_s:best"} <= set(columns)
    assert not any(c.startswith("val/accuracy") for c in columns)  # no run logged it
    assert "train/loss:best" not in columns  # not a headline metric unless asked for
    by_name = {row.split()[0]: row.split() for row in rows}
    assert set(by_name) == {"e4", "e8"}
    e4 = dict(zip(columns, by_name["e4"]))
    assert e4["status"] == "FINISHED" and e4["wall"] == "1:02:03" and e4["model.num_experts"] == "4"
    assert e4["eval/accuracy:best"] == "0.9000" and e4["eval/accuracy:final"] == "0.5000"
    assert e4["eval/loss:best"] == "0.4000" and e4["perf/img_per_s:best"] == "1,100"


def test_csv_to_stdout_parses_with_raw_values(stores, capsys):
    rows = _csv(capsys, "--run-dir", str(stores[0]))
    e8 = next(r for r in rows if r["run"] == "e8")
    assert float(e8["wall_s"]) == 60.0
    assert float(e8["eval/accuracy:best"]) == pytest.approx(0.8)
    assert float(e8["eval/accuracy:final"]) == pytest.approx(0.78)
    assert float(e8["eval/loss:best"]) == pytest.approx(0.45)
    assert e8["model.num_experts"] == "8" and len(e8["id"]) == 8


@pytest.mark.parametrize("sort,order", [
    ("eval/accuracy", ["e4", "e8"]),  # best accuracy, descending
    ("eval/accuracy:final", ["e8", "e4"]),
    ("eval/loss", ["e4", "e8"]),  # best loss, ascending: 0.4 < 0.45
    ("eval/loss:final", ["e8", "e4"]),
    ("wall", ["e8", "e4"]),
    ("model.num_experts", ["e4", "e8"]),
])
def test_sort(stores, capsys, sort, order):
    rows = _csv(capsys, "--run-dir", str(stores[0]), "--sort", sort)
    assert [r["run"] for r in rows] == order


def test_extra_metrics_get_best_only_when_it_has_a_meaning(stores, capsys):
    rows = _csv(capsys, "--run-dir", str(stores[0]), "--metrics", "train/loss,router/val/layer0/entropy")
    assert {"train/loss:best", "train/loss:final", "router/val/layer0/entropy:final"} <= set(rows[0])
    assert "router/val/layer0/entropy:best" not in rows[0]
    assert metric_goal("router/val/layer0/entropy") is None and metric_goal("val/accuracy") == "max"


def test_several_run_dirs_in_one_table(stores, capsys):
    rows = _csv(capsys, "--run-dir", *map(str, stores), "--sort", "eval/accuracy")
    assert [(r["run"], r["source"]) for r in rows] == [("e4", str(stores[0])), ("e8", str(stores[0])),
                                                        ("e16", str(stores[1]))]
    e16 = rows[-1]
    assert e16["status"] == "RUNNING"
    assert float(e16["wall_s"]) == 30.0  # never ended: up to its last logged metric (step 30 at +30 s)
    assert e16["model.num_experts"] == "16"


def test_fetch_runs_summary(stores):
    runs = {r["run_name"]: r for r in fetch_runs(f"sqlite:///{stores[0] / 'mlflow.db'}", "pce_test")}
    assert runs["e4"]["best"] == {"eval/accuracy": 0.9, "eval/loss": 0.4, "perf/img_per_s": 1100.0}
    assert runs["e4"]["metrics"]["eval/accuracy"] == 0.5
    assert runs["e4"]["experiment"] == "pce_test" and runs["e4"]["params"]["model.num_experts"] == "4"


def test_clear_errors(stores, capsys, tmp_path):
    rc, _, err = _run(capsys, "--run-dir", str(stores[0]), "--experiment", "nope")
    assert rc == 1 and "no experiment 'nope'" in err and "pce_test" in err
    rc, _, err = _run(capsys, "--run-dir", str(stores[0]), "--experiment", "empty")
    assert rc == 1 and "no runs in experiment 'empty'" in err
    rc, _, err = _run(capsys, "--run-dir", str(tmp_path))
    assert rc == 1 and "has no mlflow.db" in err
    missing = tmp_path / "mlflow.db"
    rc, _, err = _run(capsys, "--tracking-uri", f"sqlite:///{missing}")
    assert rc == 1 and "does not exist" in err and not missing.exists()  # reading never creates a store
    rc, _, err = _run(capsys, "--run-dir", str(stores[0]), "--sort", "bogus")
    assert rc == 1 and "cannot sort by 'bogus'" in err and "eval/accuracy:best" in err


def test_nothing_to_compare(monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rc, _, err = _run(capsys)
    assert rc == 1 and "--run-dir" in err


def test_csv_to_file_also_prints_the_table(stores, capsys, tmp_path):
    path = tmp_path / "runs.csv"
    rc, out, _ = _run(capsys, "--run-dir", str(stores[0]), "--csv", str(path))
    assert rc == 0 and out.startswith("run ")
    assert len(list(csv.DictReader(path.open()))) == 2


def test_specialisation_of_every_layer_is_a_column():
    """Whether each layer balances and routes by content or by place, without asking for it."""
    from pce_dist.compare import build_table

    def run(name, nmi_class):
        metrics = {"eval/accuracy": 0.9, "router/eval/layer0/nmi_class": nmi_class,
                   "router/eval/layer0/nmi_position": 0.1, "router/eval/layer1/max_share": 0.4,
                   "router/val/layer0/nmi_class": 0.5, "router/eval/layer0/entropy": 0.3}
        return {"run_name": name, "run_id": name * 8, "status": "FINISHED", "wall_time_s": 1.0, "params": {},
                "metrics": metrics, "best": {}}

    columns, rows = build_table([run("a", 0.2), run("b", 0.6)])
    assert [c for c in columns if c.startswith("router/")] == [
        "router/eval/layer0/nmi_class:final", "router/eval/layer0/nmi_position:final",
        "router/eval/layer1/max_share:final"]  # the test split's, final only; not every router statistic
    assert [r["router/eval/layer0/nmi_class:final"] for r in rows] == [0.2, 0.6]
