"""The Prometheus sink on a loopback port: scraped and parsed with prometheus_client's own parser,
a taken port is a one-line ConfigError, the textfile parses, and close() frees the port."""
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hvd_trainer.config import ConfigError
from hvd_trainer.monitor.prometheus import PrometheusSink

MB = 1024.0 * 1024.0
RECORD = {
    "epoch": 2, "step": 56, "train_loss": 0.53, "lr": 0.1, "test_loss": 0.4, "test_accuracy": 0.91,
    "samples_per_sec": 1234.5, "elapsed_s": 3.2, "samples_seen": 3584,
    "time": {"step_s": 0.005, "data_s": 0.001, "compute_s": 0.002, "exchange_s": 0.001, "optimizer_s": 0.0005,
             "other_s": 0.0005, "eval_s": 0.2},
    "ranks": [{"rank": r, "host": f"node{r + 1}", "steps": 28, "step_s": 0.005 * (r + 1), "data_s": 0.001 * (r + 1),
               "compute_s": 0.002, "exchange_s": 0.001, "optimizer_s": 0.0005, "other_s": 0.0005, "eval_s": 0.2,
               "rss_mb": 300.0 + r, "peak_rss_mb": 330.0 + r, "cpu_util": 0.97, "gpu_mb": None, "gpu_peak_mb": None}
              for r in (0, 1)],
    "stragglers": [{"rank": 1, "host": "node2", "part": "data", "ratio": 3.4, "seconds": 0.002, "median": 0.001}],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _samples(text: str) -> dict:
    """(name, sorted label items) -> value, over every sample of the exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return _samples(response.read().decode())


@pytest.fixture
def port():
    return _free_port()


@pytest.fixture
def sink(port, tmp_path):
    s = PrometheusSink(port, address="127.0.0.1", textfile=str(tmp_path / "hvd.prom"), host="node1", run="run-a")
    yield s
    s.close({}, {})  # idempotent: a test may have closed it already


def test_an_epoch_is_served_with_rank_and_host_labels(sink, port):
    sink.epoch(RECORD)
    got = _scrape(port)
    run = (("host", "node1"), ("run", "run-a"))
    for name, value in [("step", 56), ("epoch", 2), ("train_loss", 0.53), ("test_loss", 0.4), ("lr", 0.1),
                        ("test_accuracy", 0.91), ("samples_per_second", 1234.5), ("samples_seen", 3584),
                        ("stragglers", 1)]:
        assert got[("hvd_trainer_" + name, run)] == pytest.approx(value), name
    rank1 = (("host", "node2"), ("rank", "1"), ("run", "run-a"))
    assert got[("hvd_trainer_step_seconds", (("host", "node2"), ("part", "data"), ("rank", "1"),
                                             ("run", "run-a")))] == pytest.approx(0.002)
    parts = {dict(labels)["part"] for name, labels in got if name == "hvd_trainer_step_seconds"}
    assert parts == {"data", "compute", "exchange", "optimizer", "other"}  # the total is not a part
    assert got[("hvd_trainer_rss_bytes", rank1)] == 301.0 * MB
    assert got[("hvd_trainer_peak_rss_bytes", (("host", "node1"), ("rank", "0"), ("run", "run-a")))] == 330.0 * MB
    assert got[("hvd_trainer_cpu_utilization", rank1)] == pytest.approx(0.97)
    assert got[("hvd_trainer_eval_seconds", rank1)] == pytest.approx(0.2)
    assert not any(name.startswith("hvd_trainer_gpu") for name, _ in got)  # null on CPU: no sample, not 0
    assert got[("hvd_trainer_straggler_ratio", (("host", "node2"), ("part", "data"), ("rank", "1"),
                                                ("run", "run-a")))] == pytest.approx(3.4)
    assert not any(name.startswith("python_") or name.startswith("process_") for name, _ in got)  # own registry

    sink.step(57, 0.25, 0.05)  # live between epochs
    sink.epoch({**RECORD, "step": 112, "stragglers": []})  # the straggler caught up
    got = _scrape(port)
    assert got[("hvd_trainer_step", run)] == 112 and got[("hvd_trainer_stragglers", run)] == 0
    assert not any(name == "hvd_trainer_straggler_ratio" for name, _ in got)


def test_step_updates_the_live_gauges(sink, port):
    sink.step(7, 1.5, 0.01)
    got = _scrape(port)
    run = (("host", "node1"), ("run", "run-a"))
    assert (got[("hvd_trainer_step", run)], got[("hvd_trainer_train_loss", run)],
            got[("hvd_trainer_lr", run)]) == (7, 1.5, 0.01)


def test_a_taken_port_is_a_one_line_config_error(sink, port):
    with pytest.raises(ConfigError) as err:
        PrometheusSink(port, address="127.0.0.1", host="node1", run="run-b")
    assert str(err.value) == f"runtime.metrics_port: 127.0.0.1:{port} is already in use"


def test_textfile_after_each_epoch_and_final_values_at_close(sink, port, tmp_path):
    path = tmp_path / "hvd.prom"
    sink.epoch(RECORD)
    run = (("host", "node1"), ("run", "run-a"))
    assert _samples(path.read_text())[("hvd_trainer_test_accuracy", run)] == pytest.approx(0.91)
    sink.close({"final_test_accuracy": 0.95, "final_test_loss": 0.2, "steps": 168, "samples_per_sec": 1500.0}, {})
    got = _samples(path.read_text())
    assert got[("hvd_trainer_test_accuracy", run)] == pytest.approx(0.95)
    assert got[("hvd_trainer_step", run)] == 168 and got[("hvd_trainer_samples_per_second", run)] == 1500.0
    assert [p.name for p in tmp_path.iterdir()] == ["hvd.prom"]  # no temp file left behind


def test_close_frees_the_port(sink, port):
    _scrape(port)  # a served connection (its TIME_WAIT must not keep the port from a new server)
    sink.close({}, {})
    with socket.socket() as s:  # as any server binds: SO_REUSEADDR, which a live listener still refuses
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
    again = PrometheusSink(port, address="127.0.0.1", host="node1", run="run-c")
    again.close({}, {})


def test_textfile_only_needs_no_port(tmp_path):
    sink = PrometheusSink(None, textfile=str(tmp_path / "m.prom"), host="h", run="r")
    sink.close({}, {})
    assert (tmp_path / "m.prom").exists()
    with pytest.raises(ConfigError, match="^runtime.metrics_textfile: directory .* does not exist$"):
        PrometheusSink(None, textfile=str(tmp_path / "missing" / "m.prom"), host="h", run="r")
