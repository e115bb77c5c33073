"""Per-node system metrics (``pce_dist.tracking.system``) against a real MLflow store.

One sampler per node: the process with local rank 0 samples, named by its node rank; other
ranks of the node do not. Stopping is bounded even when the store hangs. The multi-node
case (two SLURM nodes, two series) runs in tests/cluster/test_tutorial.py.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from pce_dist.config import TrackingConfig
from pce_dist.tracking.system import Placement, SystemSampler, samples_node


@pytest.fixture
def store(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    for name in ("MLFLOW_SYSTEM_METRICS_NODE_ID", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
        monkeypatch.delenv(name, raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("system", artifact_location=str(tmp_path / "artifacts"))
    return uri, client, client.create_run(experiment).info.run_id


# 4 ranks on 2 hosts, 2 per host, as a launcher reports them: (hostname, node rank)
TWO_NODES = Placement.from_ranks([("a", 0), ("a", 0), ("b", 1), ("b", 1)])
ONE_NODE = Placement.from_ranks([("a", 0)])


def test_local_rank_zero_samples_its_node_into_the_run(store):
    uri, client, run_id = store
    cfg = TrackingConfig(system_metrics_interval_s=0.2)
    cfg.system_metrics_nodes = "all"  # a local file store: node 1 samples only when told to
    sampler = SystemSampler.start(cfg, TWO_NODES, 2, run_id, uri, resumed=False)
    assert sampler is not None and sampler.node_id == "node1"
    time.sleep(1.5)
    sampler.stop()
    keys = set(client.get_run(run_id).data.metrics)
    for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes", "network_receive_megabytes"):
        assert f"system/node1/{name}" in keys, sorted(keys)
    assert all(k.startswith("system/node1/") for k in keys), sorted(keys)  # nothing under another node id
    history = client.get_metric_history(run_id, "system/node1/cpu_utilization_percentage")
    assert len(history) >= 3 and [m.step for m in history] == list(range(len(history)))
    assert all(0.0 <= m.value <= 100.0 for m in history)


def test_resumed_sampler_continues_the_steps(store):
    uri, client, run_id = store
    cfg = TrackingConfig(system_metrics_interval_s=0.2)
    for resumed in (False, True):
        sampler = SystemSampler.start(cfg, ONE_NODE, 0, run_id, uri, resumed=resumed)
        time.sleep(0.9)
        sampler.stop()
    steps = [m.step for m in client.get_metric_history(run_id, "system/node0/cpu_utilization_percentage")]
    assert steps == list(range(len(steps))) and len(steps) >= 4, steps  # the second one went on from the first


def test_only_one_sampler_per_node_and_none_when_off(store):
    uri, _, run_id = store
    cfg = TrackingConfig(system_metrics_interval_s=0.2, system_metrics_nodes="all")
    assert [TWO_NODES.is_sampler(r) for r in range(4)] == [True, False, True, False]
    assert SystemSampler.start(cfg, TWO_NODES, 3, run_id, uri, resumed=False) is None  # node 1's second rank
    off = TrackingConfig(system_metrics=False)
    assert SystemSampler.start(off, TWO_NODES, 0, run_id, uri, resumed=False) is None


def test_other_nodes_sample_a_file_store_only_when_told():
    """Several hosts writing one SQLite file on a shared filesystem is unsafe: "auto" keeps them off it."""
    auto, every, main = (TrackingConfig(system_metrics_nodes=m) for m in ("auto", "all", "main"))
    sqlite, server = "sqlite:////shared/run/mlflow.db", "http://tracking:5000"
    assert samples_node(auto, 0, sqlite) and not samples_node(auto, 1, sqlite)
    assert samples_node(auto, 1, server) and samples_node(every, 1, sqlite)
    assert samples_node(main, 0, server) and not samples_node(main, 1, server)


def test_placement_repairs_node_ranks_that_disagree_with_the_hosts():
    """A launcher that sets RANK but no node rank: every host claims node 0; hosts decide instead."""
    placement = Placement.from_ranks([("a", 0), ("a", 0), ("b", 0), ("c", 0)])
    assert not placement.consistent
    assert placement.node_ranks == [0, 0, 1, 2] and placement.hosts == {0: "a", 1: "b", 2: "c"}
    assert [placement.is_sampler(r) for r in range(4)] == [True, False, True, True]
    # SLURM's emulated nodes on one host: node ranks differ, the hostname is shared -- that is consistent
    emulated = Placement.from_ranks([("h", 0), ("h", 1), ("h", 2)])
    assert emulated.consistent and emulated.node_ranks == [0, 1, 2]


def test_stop_is_bounded_when_the_store_hangs(caplog):
    """A server that accepts connections and never answers: stop gives up after its timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []

    def accept_and_say_nothing() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:  # closed at the end of the test
                return

    threading.Thread(target=accept_and_say_nothing, daemon=True).start()
    uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        cfg = TrackingConfig(system_metrics_interval_s=0.1)
        sampler = SystemSampler.start(cfg, ONE_NODE, 0, "0" * 32, uri, resumed=False)
        assert sampler is not None
        time.sleep(0.5)  # the thread is now inside a request that never returns
        start = time.monotonic()
        sampler.stop(timeout_s=1.0)
        took = time.monotonic() - start
        assert took < 2.5, f"stop took {took:.1f} s against a hung store"
        assert "did not stop within" in caplog.text
    finally:
        listener.close()
        for conn in held:
            conn.close()
