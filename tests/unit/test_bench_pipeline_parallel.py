"""hvd-bench's pipeline section without MPI: efficiency against the bubble, the memory counts
(parameters + optimizer state, and the saved-tensor counter on a real backward), the report."""
import pytest
import torch
from torch import nn

from benchmarks import cli, pipeline_parallel as pp


def test_the_section_is_registered_under_pipeline_not_the_data_pipeline():
    assert "pipeline" in cli.SECTION_NAMES
    assert cli.SECTIONS["pipeline"] is pp
    assert pp.count(None) == 1 + len(pp.LAYOUTS)


def test_efficiency_is_the_whole_step_over_p_times_the_pipelined_step():
    assert pp.bubble(2, 1) == 0.5 and pp.bubble(2, 8) == pytest.approx(8 / 9) and pp.bubble(4, 4) == pytest.approx(4 / 7)
    # a perfect pipeline of 2 halves with the bubble: T1 / (2 * T1 / 2 * (m + 1) / m)
    t1, m = 1.0, 4
    assert pp.efficiency(t1, t1 / 2 * (m + 1) / m, 2) == pytest.approx(pp.bubble(2, m))


def test_rows_pair_every_repeat_with_the_baselines_median_and_flag_m_ge_4_only():
    whole = [1.0, 1.2, 0.8]                                    # median 1.0
    piped = {"gpipe": {1: [1.0, 1.1], 4: [0.625, 0.7]}, "1f1b": {8: [0.9]}}
    rows = {(r["schedule"], r["m"]): r for r in pp.efficiency_rows(whole, piped, 2, {4: [0.5]})}
    g4 = rows[("gpipe", 4)]
    assert g4["efficiency"]["values"] == pytest.approx([0.8, 1 / 1.4])
    assert g4["theory"] == pytest.approx(0.8) and g4["ratio"] == pytest.approx((0.8 + 1 / 1.4) / 2 / 0.8)
    assert g4["ratio_min"] == pytest.approx(1 / 1.4 / 0.8) and g4["ratio_max"] == pytest.approx(1.0)
    assert g4["within"]
    assert g4["ratio_same_m"] == pytest.approx(statistics_median([0.4, 0.5 / 1.4]) / 0.8)
    assert rows[("gpipe", 1)]["within"]                        # m < 4 is reported, not judged
    assert not rows[("1f1b", 8)]["within"]                     # 0.556 against 0.889
    assert "ratio_same_m" not in rows[("1f1b", 8)]


def statistics_median(xs):
    import statistics

    return statistics.median(xs)


def test_state_bytes_count_parameters_and_adams_two_moments():
    model = nn.Linear(10, 5)                                   # 55 float32 parameters
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 10)).sum().backward()
    opt.step()
    got = pp.state_bytes(model, opt)
    assert got["params"] == 55 * 4
    assert got["optimizer"] == 2 * 55 * 4 + 2 * 4             # exp_avg, exp_avg_sq, a step count per tensor
    assert got["total"] == got["params"] + got["optimizer"]
    assert pp.memory_ratio(got, [{"total": got["total"] // 2}, {"total": got["total"] // 4}]) == pytest.approx(0.5, abs=0.01)


def test_saved_bytes_rise_with_tensors_kept_for_backward_and_fall_to_zero_after_it():
    w = nn.Parameter(torch.ones(64, 64))
    counter = pp.SavedBytes(exclude=[w])
    x = torch.ones(8, 64, requires_grad=True)
    with counter.hooks():
        h = torch.tanh(x @ w)           # saves x (w is a parameter: left out) and tanh's output
        y = (h * h).sum()               # saves h (the same storage as tanh's output: once)
    assert counter.live == 2 * 8 * 64 * 4
    y.backward()
    del h, y
    assert counter.live == 0 and counter.peak == 2 * 8 * 64 * 4


def test_saved_bytes_of_one_in_flight_microbatch_are_a_quarter_of_four():
    """The measure behind 1F1B < GPipe: holding four microbatches' graphs costs four times one's."""
    model = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32))

    def peak(in_flight: int) -> int:
        counter = pp.SavedBytes(exclude=list(model.parameters()))
        with counter.hooks():
            losses = []
            for i in range(4):
                losses.append(model(torch.ones(4, 32)).sum())
                if len(losses) == in_flight:
                    losses.pop(0).backward()
            while losses:
                losses.pop(0).backward()
        assert counter.live == 0
        return counter.peak

    assert peak(4) == 4 * peak(1)


def _steps():
    piped = {s: {str(m): [0.5 * (m + 1) / m * f] * 3 for m in pp.MICROBATCHES} for s, f in (("gpipe", 1.0), ("1f1b", 1.05))}
    return {"whole": [1.0] * 3, "whole_m": {str(m): [1.0] * 3 for m in pp.MICROBATCHES[1:]}, "piped": piped,
            "memory": {"whole": {"params": 100, "optimizer": 200, "total": 300},
                       "stages": [{"params": 52, "optimizer": 104, "total": 156}, {"params": 48, "optimizer": 96, "total": 144}]},
            "activations": {"m": 8, "gpipe": [800, 800], "1f1b": [200, 100]}}


def test_summary_and_report_state_the_targets():
    conv = {"P=1": {"final_test_perplexity": 6.0, "unigram_perplexity": 30.0, "wall_seconds": 50.0, "ranks": 1,
                    "global_batch": 32}}
    res = pp.summarize(_steps(), conv)
    assert res["memory"]["ratio"] == pytest.approx(0.52)
    assert res["activations"]["ratio"] == [0.25, 0.125] and res["activation_ratio_max"] == 0.25
    assert res["efficiency_worst_deviation"] == pytest.approx(1 - 1 / 1.05)
    assert res["target_met"]
    assert res["convergence"][0]["ratio"] == pytest.approx(0.2)
    text = pp.markdown(res, None)
    assert "| gpipe | 4 | 625 [625..625] | 0.800 [0.800..0.800] | 0.800 | **1.00 [1.00..1.00]** | 1.00 |" in text
    assert "P = 2 / P = 1: **0.520** (target <= 0.55: met)" in text
    assert "stage 0 **0.250**, stage 1 **0.125** (1F1B below GPipe: met)" in text
    assert "| P=1 | 1 | 32 | 6.000 | 30.000 | 0.200 | 50 |" in text
    assert "Against the same-m baseline (the bubble and the messages only): 0.95 to 1.00; within 10%: met" in text
