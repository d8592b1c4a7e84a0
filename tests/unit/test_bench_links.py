"""hvd-bench's links section without a testbed: the cost model's prediction from a synthetic
measured result (compute calibrated on the fastest link, errors, the PS bound ratio on capped
links only) and its report (one table per cap, the PNG, the commands, the skip)."""
import pytest

from benchmarks import core, costmodel, links

MBIT = 1e6 / 8
ALPHA = 50e-6
COMPUTE = {"ring": 0.020, "ps k=1": 0.025, "ps k=2": 0.030}


def _model_exchange(v, mbit):
    return links.exchange_s(v, links.GRAD_BYTES, costmodel.Link(ALPHA, mbit * MBIT))


def _cap(cap, mbit, slow=1.0):
    """A cap whose steps match the model exactly and whose exchanges are ``slow`` x the model."""
    return {"cap_mbit": cap, "label": links.cap_label(cap), "measured_mbit": mbit, "alpha_s": ALPHA,
            "steps_per_epoch": 1,
            "step_s": {v: core.summary([c + _model_exchange(v, mbit)] * 3) for v, c in COMPUTE.items()},
            "exchange_s": {v: core.summary([slow * _model_exchange(v, mbit)] * 3) for v in COMPUTE}}


def _result():
    return {"model": "MLP", "params": links.params(), "bytes": links.GRAD_BYTES, "workers": 2, "servers": [1, 2],
            "batch_per_worker": 32, "timed_epochs": 3, "commands": {"exchange": "ip netns exec x mpirun ..."},
            "caps": [_cap(100.0, 95.0, slow=1.25), _cap(1000.0, 940.0, slow=1.1), _cap(None, 9000.0, slow=2.0)]}


def test_the_mlp_and_variants_are_the_ones_described():
    assert links.params() == 900 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10
    assert links.GRAD_BYTES == 4 * links.params()
    assert links.variants() == {"ring": (2, 0), "ps k=1": (2, 1), "ps k=2": (2, 2)}
    assert links.HOSTS == 4  # every rank of the widest variant on a host of its own
    assert links.count(core.QUICK) == len(core.QUICK.caps_mbit) * 4
    assert links.cap_label(100.0) == "100 Mbit" and links.cap_label(1000.0) == "1 Gbit"


def test_step_counts_shrink_as_the_link_slows():
    slow, fast = links.steps_per_epoch(core.QUICK, 100.0), links.steps_per_epoch(core.QUICK, None)
    assert 1 <= slow < fast <= core.QUICK.steps
    assert 3 <= links.exchange_repeats(core.QUICK, 100.0) <= links.exchange_repeats(core.QUICK, None)


def test_prediction_recovers_compute_and_the_steps_on_every_cap():
    r = links.analyse(_result())
    assert r["calibration_cap"] == "uncapped"
    assert r["compute_s"] == pytest.approx(COMPUTE)
    for p in r["caps"]:
        for v in COMPUTE:
            assert p["predicted"][v]["step_s"] == pytest.approx(COMPUTE[v] + _model_exchange(v, p["measured_mbit"]))
            assert p["predicted"][v]["step_error"] == pytest.approx(0.0, abs=1e-9)
    # PS at 100 Mbit: 2 workers, 1 server -> 2 alpha + 4 S / B
    ps1 = r["caps"][0]["predicted"]["ps k=1"]["exchange_s"]
    assert ps1 == pytest.approx(2 * ALPHA + 4 * links.GRAD_BYTES / (95.0 * MBIT))


def test_the_ps_bound_ratio_is_the_worst_capped_link_and_points_skip_the_calibration():
    r = links.analyse(_result())
    assert r["ps_vs_bound_min"] == pytest.approx(1 / 1.25)   # uncapped (1/2.0) does not count
    assert r["caps"][2]["predicted"]["ps k=2"]["bound_vs_measured"] == pytest.approx(0.5)
    labels = [p["label"] for p in r["points"]]
    assert not any("step, uncapped" in label for label in labels)  # equal by construction
    assert len(labels) == 3 * 3 + 2 * 3                              # exchanges everywhere, steps on 2 caps
    ex = next(p for p in r["points"] if p["label"] == "ring exchange alone, 1 Gbit")
    assert ex["error"] == pytest.approx(1 / 1.1 - 1)


def test_markdown_writes_the_plot_a_table_per_cap_and_the_commands(tmp_path):
    text = links.markdown(links.analyse(_result()), tmp_path)
    assert (tmp_path / "links_step_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](plots/links_step_time.png)" in text
    assert text.count("| strategy | N | k |") == 3
    assert sum(line.startswith("| ps sync | 2 | 2 |") for line in text.splitlines()) == 3
    assert "(calibration)" in text and "**0.80**" in text and "met" in text
    assert "`ip netns exec x mpirun ...`" in text


def test_a_skipped_result_says_why(tmp_path):
    assert links.markdown({"skipped": "needs root"}, tmp_path) == "Skipped: needs root"
