"""Prometheus sink (rank 0 only): the latest epoch's figures as gauges, served over HTTP on
``runtime.metrics_port`` and/or written to a node-exporter textfile after every epoch.

Every series carries ``run`` (the run dir's name). Per-rank series add ``rank`` and ``host`` (that
rank's machine); run-level series add ``host`` (rank 0's, where this exporter runs). Step times
are seconds per step for each part (label ``part``), never the total as a part, so that
``sum by (rank)`` over parts is the step time.

The sink has its own registry: the process-global one would also export the Python runtime's
collectors and could not hold two sinks (tests, or two runs in one process).
"""
from __future__ import annotations

import errno
import math
import os
import time
from typing import Any, Optional

from prometheus_client import CollectorRegistry, Gauge, start_http_server, write_to_textfile

from ..config import ConfigError
from .phases import STEP_PARTS

_MB = 1024.0 * 1024.0
PREFIX = "hvd_trainer_"
RANK_LABELS = ("run", "rank", "host")
RUN_LABELS = ("run", "host")
# record key -> (gauge name, help); one per run-level figure an epoch record carries
RUN_FIGURES = {
    "step": ("step", "Global optimizer step at the end of the last epoch."),
    "epoch": ("epoch", "Last finished epoch."),
    "train_loss": ("train_loss", "Mean training loss of the last epoch."),
    "test_loss": ("test_loss", "Test loss after the last epoch."),
    "test_accuracy": ("test_accuracy", "Test accuracy after the last epoch (0..1)."),
    "samples_per_sec": ("samples_per_second", "Training throughput, samples per second over all ranks."),
    "lr": ("lr", "Learning rate."),
    "samples_seen": ("samples_seen", "Training samples consumed so far."),
}
# summary.json key -> record key whose gauge it finalises
FINAL = {"steps": "step", "final_train_loss": "train_loss", "final_test_loss": "test_loss",
         "final_test_accuracy": "test_accuracy", "samples_per_sec": "samples_per_sec"}


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


class PrometheusSink:
    """Gauges in a private registry. ``port`` (None: no server) is served on ``address`` from the
    constructor on, so a scrape sees the run from its start; a port already in use is a
    :class:`ConfigError`. ``textfile`` is rewritten atomically after every epoch and at close.
    ``close`` keeps serving ``linger_s`` seconds so the final values outlive one scrape interval.
    """

    def __init__(self, port: Optional[int], address: str = "127.0.0.1", textfile: Optional[str] = None, *,
                 host: str, run: str, linger_s: float = 0.0):
        self.host, self.run, self.textfile, self.linger_s = host, run, textfile, linger_s
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.step_seconds = Gauge(PREFIX + "step_seconds", "Seconds per step spent in each part, this rank, "
                                  "mean over the last epoch.", RANK_LABELS + ("part",), registry=r)
        self.eval_seconds = Gauge(PREFIX + "eval_seconds", "Seconds of the last epoch's evaluation.",
                                  RANK_LABELS, registry=r)
        self.rss = Gauge(PREFIX + "rss_bytes", "Resident memory at the end of the last epoch.", RANK_LABELS, registry=r)
        self.peak_rss = Gauge(PREFIX + "peak_rss_bytes", "Peak resident memory.", RANK_LABELS, registry=r)
        self.cpu = Gauge(PREFIX + "cpu_utilization", "CPU seconds per wall second over the last epoch "
                         "(cores busy).", RANK_LABELS, registry=r)
        self.gpu = Gauge(PREFIX + "gpu_bytes", "CUDA memory allocated (absent on CPU).", RANK_LABELS, registry=r)
        self.gpu_peak = Gauge(PREFIX + "gpu_peak_bytes", "Peak CUDA memory allocated (absent on CPU).",
                              RANK_LABELS, registry=r)
        self.figures = {key: Gauge(PREFIX + name, doc, RUN_LABELS, registry=r)
                        for key, (name, doc) in RUN_FIGURES.items()}
        self.stragglers = Gauge(PREFIX + "stragglers", "Ranks flagged as stragglers in the last epoch.",
                                RUN_LABELS, registry=r)
        self.straggler_ratio = Gauge(PREFIX + "straggler_ratio", "A flagged rank's time in a part over the "
                                     "median rank's, last epoch.", RANK_LABELS + ("part",), registry=r)
        self._flagged: set = set()
        self._server = self._thread = None
        if textfile is not None:
            directory = os.path.dirname(os.path.abspath(textfile))
            if not os.path.isdir(directory):
                raise ConfigError(f"runtime.metrics_textfile: directory {directory} does not exist")
        if port is not None:
            try:
                self._server, self._thread = start_http_server(port, addr=address, registry=r)
            except OSError as err:  # the bind (or resolving address) failed
                if err.errno == errno.EADDRINUSE:
                    raise ConfigError(f"runtime.metrics_port: {address}:{port} is already in use") from None
                raise ConfigError(f"runtime.metrics_port: cannot listen on {address}:{port}: "
                                  f"{err.strerror or err}") from None

    def _run(self, key: str, value: Any) -> None:
        _set(self.figures[key], (self.run, self.host), value)

    def step(self, step: int, loss: float, lr: float) -> None:
        """Every optimizer step: three gauge sets, no I/O (a scrape reads them when it comes)."""
        self._run("step", step)
        self._run("train_loss", loss)
        self._run("lr", lr)

    def epoch(self, record: dict) -> None:
        for key in RUN_FIGURES:
            self._run(key, record.get(key))
        for entry in record.get("ranks") or []:  # rows of older runs may lack it
            labels = (self.run, str(entry.get("rank")), str(entry.get("host")))
            for part in STEP_PARTS:
                _set(self.step_seconds, labels + (part,), entry.get(f"{part}_s"))
            _set(self.eval_seconds, labels, entry.get("eval_s"))
            _set(self.rss, labels, entry.get("rss_mb"), _MB)
            _set(self.peak_rss, labels, entry.get("peak_rss_mb"), _MB)
            _set(self.cpu, labels, entry.get("cpu_util"))
            _set(self.gpu, labels, entry.get("gpu_mb"), _MB)
            _set(self.gpu_peak, labels, entry.get("gpu_peak_mb"), _MB)
        self._set_stragglers(record.get("stragglers") or [])
        self._write_textfile()

    def _set_stragglers(self, found: list) -> None:
        flagged = set()
        for s in found:
            labels = (self.run, str(s.get("rank")), str(s.get("host")), str(s.get("part")))
            if _number(s.get("ratio")) is not None:
                _set(self.straggler_ratio, labels, s["ratio"])
                flagged.add(labels)
        # last epoch's flags only: a rank that caught up drops out (removed, not set to 0,
        # so the series' absence is the all-clear)
        for labels in self._flagged - flagged:
            self.straggler_ratio.remove(*labels)
        self._flagged = flagged
        self.stragglers.labels(self.run, self.host).set(len({labels[1] for labels in flagged}))

    def close(self, summary: dict, config: dict) -> None:
        """Final values, last textfile, ``linger_s`` more seconds of serving, then the port is
        released. Also after a failed run (``summary == {}``): the last epoch's values stay."""
        try:
            for key, target in FINAL.items():
                if key in (summary or {}):
                    self._run(target, summary[key])
            self._write_textfile()
            if self._server is not None and self.linger_s > 0:
                time.sleep(self.linger_s)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()  # stops serve_forever in the server's thread
            server.server_close()  # closes the listening socket: the port is free
            self._thread.join(timeout=5)

    def _write_textfile(self) -> None:
        if self.textfile is not None:
            write_to_textfile(self.textfile, self.registry)  # temp file + rename: never half a file


def _set(gauge: Gauge, labels: tuple, value: Any, scale: float = 1.0) -> None:
    value = _number(value)
    if value is not None:  # null (no GPU) or absent: no series rather than a false 0 (labels() makes one)
        gauge.labels(*labels).set(value * scale)
