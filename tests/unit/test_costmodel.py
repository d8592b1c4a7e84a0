"""The cost model in closed form, its calibration on synthetic measurements, and hvd-bench's
report and --advise on a synthetic results file (no MPI, no measurement)."""
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import cli, costmodel
from benchmarks.costmodel import Link

MB = 1 << 20


def test_ring_and_ps_in_closed_form():
    link = Link(alpha_s=1e-5, bandwidth=1e9)
    s = 100 * MB
    assert costmodel.ring_allreduce_s(s, 1, link) == 0.0
    assert costmodel.ring_allreduce_s(s, 2, link) == pytest.approx(2e-5 + s / 1e9)
    # the bandwidth term tends to 2 S/B, the latency term grows linearly
    assert costmodel.ring_allreduce_s(s, 1000, link) == pytest.approx(2 * 999e-5 + 2 * 999 / 1000 * s / 1e9)
    # k = N servers: every host moves S each way; one server: N S each way
    assert costmodel.ps_push_pull_s(s, 8, 8, link) == pytest.approx(2e-5 + 2 * s / 1e9)
    assert costmodel.ps_push_pull_s(s, 8, 1, link) == pytest.approx(2e-5 + 2 * 8 * s / 1e9)
    with pytest.raises(ValueError):
        costmodel.ps_push_pull_s(s, 0, 1, link)


def test_step_overlap_hides_at_most_the_compute():
    assert costmodel.step_s(1.0, 0.5) == 1.5
    assert costmodel.step_s(1.0, 0.5, overlap=1.0) == 1.0       # fully hidden
    assert costmodel.step_s(0.1, 1.0, overlap=1.0) == pytest.approx(1.0)  # cannot hide more than compute
    assert costmodel.efficiency(1.0, 1.0) == 0.5
    with pytest.raises(ValueError):
        costmodel.step_s(1.0, 1.0, overlap=1.5)


@settings(max_examples=50, deadline=None)
@given(alpha=st.floats(1e-7, 1e-2), gbyte_s=st.floats(0.01, 100.0))
def test_fit_recovers_alpha_and_bandwidth_from_exact_points(alpha, gbyte_s):
    link = Link(alpha, gbyte_s * 1e9)
    pts = [(s, link.message_s(s)) for s in (4096, 65536, MB, 16 * MB, 64 * MB)]
    got = costmodel.fit(pts)
    # the fitted model reproduces every point (a line through exact points)
    assert all(abs(costmodel.relative_error(got.message_s(s), t)) < 1e-6 for s, t in pts)


def test_two_regimes_are_found_where_one_line_cannot_fit():
    small, large = Link(1e-6, 10e9), Link(2e-4, 2e9)   # in cache, then out of it
    sizes = [4096 * 4 ** i for i in range(8)]
    pts = [(s, (small if s <= 256 * 1024 else large).message_s(s)) for s in sizes]
    one = costmodel.fit(pts)
    assert max(abs(costmodel.relative_error(one.message_s(s), t)) for s, t in pts) > 0.2
    model = costmodel.fit_path(pts)
    assert len(model.regimes) == 2 and model.regimes[0][0] == 256 * 1024
    assert max(abs(e["error"]) for e in costmodel.errors(pts, model.predict)) < 1e-6


def test_advice_prefers_the_ring_on_a_slow_link_with_many_workers_and_is_sorted():
    rows = costmodel.advise(25.6e6, 64, Link.gbit(10, 1e-5), compute_s=0.3)
    assert [r["step_s"] for r in rows] == sorted(r["step_s"] for r in rows)
    assert rows[0]["strategy"] == "horovod" and rows[0]["vs_best"] == 1.0
    one_server = next(r for r in rows if r["knobs"].startswith("ps.num_servers=1 "))
    assert one_server["vs_best"] > 10  # 64 workers through one server's link


def test_projection_falls_with_workers_and_overlap_helps():
    rows = costmodel.project()
    effs = [r["ring_eff"] for r in rows]
    assert effs == sorted(effs, reverse=True) and all(0 < e <= 1 for e in effs)
    assert all(r["ring_eff_overlap"] >= r["ring_eff"] for r in rows)


def _synthetic_results() -> dict:
    def pts(alpha, bw):
        return {str(s): {"seconds": {"median": alpha + s / bw, "min": alpha + s / bw, "max": alpha + s / bw},
                         "busbw": bw} for s in (4, 4096, MB, 16 * MB)}
    paths = {name: {"env": {}, "np": 2, "points": pts(a, b)} for name, a, b in (
        ("mpi", 1e-6, 5e9), ("horovod-mpi/trainer", 1e-3, 4e9), ("torch-gloo", 1e-4, 2e9), ("ps", 2e-4, 2e9))}
    thr = {"model": "m", "params": 1_000_000, "batch_per_rank": 32, "ranks": {
        "2": {n: {"median": v, "min": v, "max": v, "vs_limit": v / 100} for n, v in
              (("limit", 100.0), ("horovod", 96.0), ("hand/ddp", 90.0), ("ddp", 90.0), ("ps/sync", 60.0),
               ("hand/ps-naive", 55.0))}}, "ps_sync_vs_naive": 60 / 55}
    return {"machine": {"cpu": "test"}, "sections": {
        "collectives": {"np": 2, "sizes": [4, 4096, MB, 16 * MB], "paths": paths,
                        "ratios_16MB": {"horovod-mpi/trainer": 0.8}, "meta": {"mode": "quick"}},
        "throughput": thr}}


def test_report_is_generated_from_results_with_targets_plots_and_model_errors(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(_synthetic_results()))
    assert cli.main(["--report-only", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "REPORT.md").read_text()
    assert "| default strategy (horovod) at 2 ranks / limit | 0.960 | >= 0.95 | yes |" in report
    assert "not measured" in report  # the sections that did not run say so
    for png in ("collectives_busbw.png", "throughput_vs_limit.png", "model_vs_measured.png", "projection.png"):
        assert (tmp_path / "plots" / png).stat().st_size > 1000
    # exact alpha-beta data: the calibrated collective paths reproduce their points
    assert "| collectives | fit | mpi 16777216 B | 3.36 ms | 3.36 ms | " in report


def test_advise_prints_a_ranking_and_refuses_without_a_link(tmp_path, capsys):
    assert cli.main(["--advise", "--params", "25.6e6", "--workers", "64", "--link-gbit", "25",
                     "--compute-ms", "300", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fastest: horovod" in out and "ps.num_servers=64" in out
    assert cli.main(["--advise", "--workers", "8", "--out", str(tmp_path)]) == 2
    with pytest.raises(SystemExit) as err:
        cli.main(["--only", "nope"])
    assert err.value.code == 2


def test_fmt_seconds():
    assert costmodel.fmt_seconds(2.5) == "2.50 s" and costmodel.fmt_seconds(0.0025) == "2.50 ms"
    assert costmodel.fmt_seconds(2.5e-6) == "2.5 µs" and costmodel.fmt_seconds(math.inf) == "inf"


def test_pipeline_terms_in_closed_form():
    assert costmodel.pipeline_bubble(1, 8) == 0.0
    assert costmodel.pipeline_bubble(2, 1) == 0.5 and costmodel.pipeline_bubble(4, 8) == pytest.approx(3 / 11)
    assert costmodel.activation_traffic_bytes(4, 8, 1 * MB) == 2 * 3 * 8 * MB
    assert costmodel.activation_traffic_bytes(1, 8, 1 * MB) == 0
    assert costmodel.gradient_traffic_bytes(100 * MB, 1) == 0.0
    assert costmodel.gradient_traffic_bytes(100 * MB, 4) == pytest.approx(1.5 * 100 * MB)
    link = Link(alpha_s=1e-5, bandwidth=1e9)
    # P = 1 is data parallelism: compute plus the ring over every replica
    assert costmodel.pipeline_step_s(1.0, 1, 1, 0, 100 * MB, 8, link) == pytest.approx(
        1.0 + costmodel.ring_allreduce_s(100 * MB, 8, link))
    # P = 4, m = 8: (m + P - 1) shares of compute/m and two messages each, then a ring of S/P over D
    a, s = 2 * MB, 100 * MB
    want = 11 * (0.5 / 8 + 2 * (1e-5 + a / 1e9)) + 2 * 1e-5 + s / 4 / 1e9
    assert costmodel.pipeline_step_s(0.5, 4, 8, a, s, 2, link) == pytest.approx(want)
    with pytest.raises(ValueError):
        costmodel.pipeline_bubble(0, 1)


def test_pipeline_stages_pay_for_a_big_model_on_a_slow_link_and_not_for_a_small_one():
    slow = Link.gbit(10.0, alpha_s=5e-6)
    big = costmodel.advise_pipeline(1.3e9, 64, slow, 0.5, activation_bytes=25e6, microbatches=8)
    assert big[0]["stages"] > 1 and big == sorted(big, key=lambda r: r["step_s"])
    assert {r["stages"] for r in big} == {1, 2, 4, 8, 16, 32, 64}
    dp = next(r for r in big if r["stages"] == 1)
    assert dp["bubble"] == 0 and dp["activation_bytes"] == 0 and dp["state_per_rank"] == 1
    small = costmodel.advise_pipeline(25.6e6, 64, Link.gbit(25.0, alpha_s=5e-6), 0.32, activation_bytes=100e6)
    assert small[0]["stages"] == 1 and small[0]["vs_best"] == 1.0


def test_advise_ranks_pipeline_depths_when_given_the_activation(capsys):
    assert cli.main(["--advise", "--params", "1.3e9", "--workers", "64", "--link-gbit", "10", "--compute-ms", "500",
                     "--activation-mb", "25", "--out", "/nonexistent"]) == 0
    out = capsys.readouterr().out
    assert "pipeline stages P x replicas D = 64, m = 8" in out and "pipeline stages pay: P = " in out


def test_local_sgd_moves_the_ring_once_every_h_steps_in_closed_form():
    link = Link(alpha_s=1e-5, bandwidth=1e8)
    s, c = 100 * MB, 0.05
    ring = costmodel.ring_allreduce_s(s, 8, link)
    assert costmodel.local_sgd_step_s(c, s, 8, link, 1) == pytest.approx(c + ring)  # H = 1: the ring every step
    assert costmodel.local_sgd_step_s(c, s, 8, link, 16) == pytest.approx(c + ring / 16)
    with pytest.raises(ValueError):
        costmodel.local_sgd_step_s(c, s, 8, link, 0)
    rows = costmodel.advise_local_sgd(s / 4, 8, link, c, [1, 4, 64], overlap=0.0)
    for r in rows:  # without overlap: (c + ring) / (c + ring / H), never above H
        assert r["speedup"] == pytest.approx((c + ring) / (c + ring / r["sync_every"]))
        assert r["speedup"] <= r["sync_every"]
        assert r["bytes_per_step"] == pytest.approx(2 * 7 / 8 * s / r["sync_every"])
    assert rows[0]["speedup"] == pytest.approx(1.0)
    # overlap helps the synchronous ring only: H = 1 is slower than it then
    assert costmodel.advise_local_sgd(s / 4, 8, link, c, [1])[0]["speedup"] < 1.0


def test_advise_prints_local_sgd_speedups_and_says_they_are_time_only(tmp_path, capsys):
    assert cli.main(["--advise", "--params", "25.6e6", "--workers", "8", "--link-gbit", "0.1", "--compute-ms", "300",
                     "--sync-every", "4,64", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "strategy=local_sgd" in out
    assert "time per step only" in out
    lines = [line.split() for line in out.splitlines() if line.strip().startswith(("4 ", "64 "))]
    assert [int(x[0]) for x in lines] == [4, 64] and float(lines[1][-1][:-1]) > float(lines[0][-1][:-1]) > 1
    with pytest.raises(SystemExit):
        cli.main(["--advise", "--sync-every", "0", "--link-gbit", "1", "--compute-ms", "1"])
