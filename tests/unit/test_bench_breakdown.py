"""hvd-bench's explanation of the gap to the limit, without MPI: a trainer run's breakdown read
back, the causes that add up to the gap, the verdict rule, and the throughput report's table."""
import json
from pathlib import Path

import pytest

from benchmarks import breakdown, core, throughput

LIMIT = {"data_s": 0.0, "compute_s": 0.100, "exchange_s": 0.0, "optimizer_s": 0.004, "other_s": 0.001,
         "step_s": 0.105, "cpu_util": 1.0}


def _time(data=0.0002, compute=0.100, exchange=0.0, optimizer=0.004, other=0.001):
    parts = {"data_s": data, "compute_s": compute, "exchange_s": exchange, "optimizer_s": optimizer, "other_s": other}
    return {**parts, "step_s": sum(parts.values())}


def test_verdict_names_the_largest_cause_or_none_within_the_noise():
    causes = {"exchange": 0.004, "compute": 0.009, "overhead": 0.001}
    assert breakdown.verdict(0.13, causes) == "compute"
    assert breakdown.verdict(0.13, {**causes, "exchange": 0.010}) == "exchange"
    assert breakdown.verdict(0.13, {"exchange": 0.0, "compute": -0.002, "overhead": 0.015}) == "overhead"
    assert breakdown.verdict(breakdown.AT_LIMIT - 1e-9, causes) == "at-limit"
    assert breakdown.verdict(-0.2, causes) == "at-limit"  # faster than the limit: nothing to explain


@pytest.mark.parametrize("t, expected", [
    (_time(exchange=0.020), "exchange"),
    (_time(compute=0.120, exchange=0.003), "compute"),
    (_time(data=0.010, other=0.008), "overhead"),
    (_time(exchange=0.001), "at-limit"),
])
def test_the_causes_add_up_to_the_gap(t, expected):
    g = breakdown.explain(t, LIMIT)
    assert g["exchange_s"] + g["compute_s"] + g["overhead_s"] == pytest.approx(g["gap_s"])
    assert g["gap_s"] == pytest.approx(t["step_s"] - LIMIT["step_s"])
    assert g["verdict"] == expected
    assert g["text"] == breakdown.CAUSES.get(expected, breakdown.AT_LIMIT_TEXT)
    assert g["compute_vs_limit_compute"] == pytest.approx(t["compute_s"] / LIMIT["compute_s"])
    assert g["compute_vs_limit_step"] == pytest.approx(t["compute_s"] / LIMIT["step_s"])


def test_a_limit_without_its_own_laps_counts_its_whole_step_as_compute():
    lim = breakdown.limit_time({"median": 640.0}, ranks=2, batch=32)  # 320 samples/s per rank
    assert lim["step_s"] == lim["compute_s"] == pytest.approx(0.1)
    g = breakdown.explain(_time(compute=0.100, optimizer=0.004, other=0.001, data=0.0), lim)
    assert g["overhead_s"] == pytest.approx(0.005)  # the update is then overhead, as the limit's is unknown
    assert breakdown.limit_time({"median": 640.0, "time": LIMIT}, 2, 32) == LIMIT


def _row(epoch, step_s, util):
    t = _time(compute=step_s - 0.0052)
    return {"epoch": epoch, "time": t, "ranks": [{"rank": 0, "cpu_util": util}, {"rank": 1, "cpu_util": util + 0.2}]}


def test_read_run_averages_the_timed_epochs_and_drops_the_warm_up(tmp_path):
    rows = [_row(1, 0.5, 0.5), _row(2, 0.1, 1.0), _row(3, 0.2, 1.2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = breakdown.read_run(str(tmp_path))
    assert t["step_s"] == pytest.approx(0.15)
    assert t["compute_s"] == pytest.approx(0.15 - 0.0052)
    assert t["cpu_util"] == pytest.approx(1.2)  # mean over ranks, then over the timed epochs


def test_read_run_of_a_trainer_without_the_breakdown_is_none(tmp_path):
    rows = [{"epoch": e, "epoch_samples_per_sec": 100.0} for e in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert breakdown.read_run(str(tmp_path)) is None


def test_median_over_rounds_is_per_key_and_skips_missing_rounds():
    m = breakdown.median_over([{"step_s": 1.0, "cpu_util": None}, None, {"step_s": 3.0, "cpu_util": 1.1},
                               {"step_s": 2.0, "cpu_util": 0.9}])
    assert m == {"step_s": 2.0, "cpu_util": 1.0, "rounds": 3}
    assert breakdown.median_over([None, None]) is None


def _per():
    per = {"limit": {"median": 610.0}, "horovod": {"median": 560.0}, "ps/sync": {"median": 480.0},
           "hand/ddp": {"median": 500.0}}
    times = {"limit": [LIMIT, LIMIT], "horovod": [_time(compute=0.108, exchange=0.004)] * 2,
             "ps/sync": [_time(exchange=0.030, optimizer=0.0001), _time(exchange=0.028, optimizer=0.0001)]}
    throughput.explain_gaps(per, times, 2)
    return per


def test_explain_gaps_gives_trainer_variants_a_breakdown_and_a_verdict_and_the_rest_none():
    per = _per()
    assert per["limit"]["time"]["rounds"] == 2 and "gap" not in per["limit"]
    assert per["horovod"]["gap"]["verdict"] == "compute"
    assert per["ps/sync"]["time"]["exchange_s"] == pytest.approx(0.029)
    assert per["ps/sync"]["gap"]["verdict"] == "exchange"
    assert "time" not in per["hand/ddp"] and "gap" not in per["hand/ddp"]


def test_the_throughput_report_shows_the_shares_and_one_verdict_per_trainer_variant():
    text = breakdown.markdown({"2": _per()})
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| variant | ranks | step ms | data | compute | exchange | optimizer | other |")
    limit_row = next(line for line in table if line.startswith("| limit |"))
    assert "| 105.0 | 0.0% | 95.2% | 0.0% | 3.8% | 1.0% | 1.000 | 0.952 | 1.00 |" in limit_row
    hvd_row = next(line for line in table if line.startswith("| horovod |"))
    assert "| 1.080 | 1.029 |" in hvd_row  # compute against the limit's compute, and its step
    verdicts = [line for line in text.splitlines() if line.startswith("- **")]
    assert len(verdicts) == 2
    assert "horovod**, 2 ranks" in verdicts[0] and breakdown.CAUSES["compute"] in verdicts[0]
    assert breakdown.CAUSES["exchange"] in verdicts[1]
    assert breakdown.markdown({"2": {"hand/ddp": {"median": 1.0}}}) == ""


class _FakeBench:
    """Runs no job: the limit and the trainer variants report fixed rates, a trainer leaves a
    metrics.jsonl with a breakdown, and strategy=ddp fails as a broken job does."""

    def __init__(self, tmp_path):
        self.mode = core.Mode("test", repeats=1, warmup=0, rounds=2, sizes=(), latency_sizes=(), steps=3, blocks=2,
                              epochs=1, caps_mbit=())
        self.tmp, self.dirs, self.jobs, self.logged = tmp_path, 0, [], []

    def scratch(self):
        self.dirs += 1
        (self.tmp / str(self.dirs)).mkdir()
        return str(self.tmp / str(self.dirs))

    def log(self, msg):
        self.logged.append(msg)

    def tick(self, desc):
        pass

    def job(self, module, args, np, env=None, desc=""):
        self.jobs.append(args)
        if "strategy=ddp" in args:
            raise core.BenchError("job failed (exit 1)\n[rank0]: Traceback\n[rank0]:   File x\n"
                                  "[rank0]: ValueError: Communication hook: bucket annotation should be dist.GradBucket.\n"
                                  "mpirun detected that one or more processes exited")
        if args[0] == "limit":
            return {"samples_per_s": [320.0 * np] * 2, "time": dict(LIMIT)}
        if args[0] == "trainer":
            run_dir = args[args.index("--run-dir") + 1]
            rows = [{"epoch": e, "time": _time(exchange=0.02)} for e in (1, 2, 3)]
            (Path(run_dir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return {"samples_per_s": [300.0, 310.0]}


def test_a_failing_variant_loses_only_its_own_row_and_is_named_in_the_report(tmp_path):
    bench = _FakeBench(tmp_path)
    res = throughput.run(bench)
    assert set(res["failed_variants"]) == {"1/ddp", "2/ddp"}
    assert sum("strategy=ddp" in a for a in bench.jobs) == 2  # once per rank count, not again in round 2
    assert "ddp" not in res["ranks"]["2"] and res["ranks"]["2"]["horovod"]["gap"]["verdict"] == "exchange"
    assert res["ranks"]["2"]["horovod"]["time"]["rounds"] == 2
    text = throughput.markdown(res, tmp_path / "plots")
    assert "- **ddp** at 2 ranks: `ValueError: Communication hook: bucket annotation should be dist.GradBucket.`" in text
    assert "| horovod | 2 |" in text and breakdown.CAUSES["exchange"] in text
