"""The monitor's pure parts: step phases on a fake clock, the straggler rule, resource samples."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvd_trainer.monitor.monitor import compact
from hvd_trainer.monitor.phases import STEP_PARTS, StepPhases, mean_over, per_step
from hvd_trainer.monitor.resources import ResourceMeter, peak_rss_bytes, rss_bytes
from hvd_trainer.monitor.straggler import describe, find_stragglers


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        self.now += dt


def test_laps_are_contiguous_and_charged_to_their_part():
    clock = Clock()
    ph = StepPhases(clock)
    for _ in range(3):
        ph.begin()
        clock.advance(0.001)
        ph.lap("data")
        clock.advance(0.010)
        ph.lap("compute")
        clock.advance(0.004)
        ph.lap("exchange")
        clock.advance(0.002)
        ph.lap("optimizer")
        clock.advance(0.003)  # checkpoint, bookkeeping
        ph.end()
    clock.advance(5.0)  # between steps and outside the loop: nobody's time
    ph.lap("exchange")
    with ph.evaluating():
        clock.advance(0.5)
    got = ph.take()
    assert got["steps"] == 3
    assert got["data_s"] == pytest.approx(0.003) and got["compute_s"] == pytest.approx(0.030)
    assert got["exchange_s"] == pytest.approx(0.012) and got["optimizer_s"] == pytest.approx(0.006)
    assert got["other_s"] == pytest.approx(0.009) and got["eval_s"] == pytest.approx(0.5)
    mean = per_step(got)
    assert mean["step_s"] == pytest.approx(0.020) and mean["compute_s"] == pytest.approx(0.010)
    assert ph.take()["steps"] == 0  # a new period


def test_split_at_an_earlier_instant():
    """DDP: backward returns after the exchange; the last bucket's ready time splits it."""
    clock = Clock()
    ph = StepPhases(clock)
    ph.begin()
    t_ready = clock.now + 0.007
    clock.advance(0.010)
    ph.lap("compute", at=t_ready)
    ph.lap("exchange")
    ph.end()
    got = ph.take()
    assert got["compute_s"] == pytest.approx(0.007) and got["exchange_s"] == pytest.approx(0.003)


@given(st.lists(st.tuples(st.sampled_from(STEP_PARTS), st.floats(0, 1)), max_size=30))
def test_parts_always_sum_to_the_step_time(laps):
    clock = Clock()
    ph = StepPhases(clock)
    ph.begin()
    start = clock.now
    for part, dt in laps:
        clock.advance(dt)
        ph.lap(part)
    clock.advance(0.25)
    ph.end()
    assert per_step(ph.take())["step_s"] == pytest.approx(clock.now - start)


def _ranks(data, compute):
    return [{"rank": i, "host": f"n{i}", "data_s": d, "compute_s": c} for i, (d, c) in enumerate(zip(data, compute))]


def test_the_slow_rank_is_named_with_its_part():
    found = find_stragglers(_ranks([0.001, 0.001, 0.030], [0.010, 0.011, 0.010]), 1.25, 0.002)
    assert [(s["rank"], s["part"]) for s in found] == [(2, "data")]
    assert found[0]["ratio"] == pytest.approx(30.0)
    assert "rank 2 on n2" in describe(found[0]) and "data wait" in describe(found[0])
    found = find_stragglers(_ranks([0.001] * 4, [0.010, 0.010, 0.016, 0.010]), 1.25, 0.002)
    assert [(s["rank"], s["part"]) for s in found] == [(2, "compute")]
    assert "forward+backward" in describe(found[0])


def test_balanced_or_small_differences_name_nobody():
    assert find_stragglers(_ranks([0.001, 0.0011, 0.0009], [0.010, 0.0115, 0.0095]), 1.25, 0.002) == []
    # three times the median, but 0.2 ms: below the absolute floor
    assert find_stragglers(_ranks([0.0001, 0.0001, 0.0003], [0.01] * 3), 1.25, 0.002) == []
    assert find_stragglers(_ranks([0.5], [0.5]), 1.25, 0.0) == []


def test_two_ranks_one_slow():
    found = find_stragglers(_ranks([0.001, 0.001], [0.010, 0.020]), 1.25, 0.002)
    assert [(s["rank"], s["part"]) for s in found] == [(1, "compute")]


def test_pipeline_stages_are_compared_only_with_their_own_stage():
    # stage 1 does three times stage 0's work on every replica: nobody is slow
    ranks = _ranks([0.001] * 4, [0.010, 0.030, 0.010, 0.030])
    for r in ranks:
        r["stage"] = r["rank"] % 2
    assert find_stragglers(ranks, 1.25, 0.002) == []
    ranks[3]["compute_s"] = 0.060  # replica 1's stage 1 is twice its peer
    assert [(s["rank"], s["part"]) for s in find_stragglers(ranks, 1.25, 0.002)] == [(3, "compute")]


def test_mean_over_and_compact_line():
    rows = [{"step_s": 0.010, "compute_s": 0.006}, {"step_s": 0.020, "compute_s": 0.010}]
    assert mean_over(rows, ("step_s", "compute_s")) == {"step_s": pytest.approx(0.015), "compute_s": pytest.approx(0.008)}
    line = compact({"step_s": 0.010, "data_s": 0.001, "compute_s": 0.006, "exchange_s": 0.002,
                    "optimizer_s": 0.0005, "other_s": 0.0005})
    assert line == "step 10.0ms: data 10% compute 60% exchange 20% optimizer 5% other 5%"
    assert compact({}) == ""


def test_resources_are_plausible():
    meter = ResourceMeter()
    blob = bytearray(64 * 1024 * 1024)  # 64 MiB, touched
    for i in range(0, len(blob), 4096):
        blob[i] = 1
    x = 0
    for i in range(300_000):  # some CPU
        x += i
    got = meter.sample()
    assert got["rss_mb"] >= 64 and got["peak_rss_mb"] >= got["rss_mb"] - 1
    assert 0.2 < got["cpu_util"] < 64
    assert got["gpu_mb"] is None and got["gpu_peak_mb"] is None
    assert rss_bytes() > 0 and peak_rss_bytes() >= rss_bytes() // 2
    del blob
