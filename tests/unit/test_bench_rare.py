"""hvd-bench's rare section without a testbed: time and bytes at the target, ratios to allreduce,
PowerSGD's traffic estimate, the variants and the report on a synthetic result."""
import pytest

from benchmarks import core, rare


def _rows(accs, seconds_per_epoch=1.0, bytes_per_epoch=1000, start=0.5):
    return [{"epoch": e, "step": rare.EPOCH_STEPS * e, "elapsed_s": start + seconds_per_epoch * e,
             "test_accuracy": a, "train_loss": 1.0 / e, "bytes_sent": bytes_per_epoch * e}
            for e, a in enumerate(accs, 1)]


def test_the_target_is_the_first_evaluation_at_or_above_it_with_its_bytes():
    rows = _rows([0.5, 0.94, 0.95, 0.93, 0.99], seconds_per_epoch=2.0, bytes_per_epoch=10)
    assert rare.at_target(rows) == {"epoch": 3, "step": 3 * rare.EPOCH_STEPS, "seconds": 6.5, "bytes": 30}
    assert rare.at_target(rows, 0.99)["epoch"] == 5       # a later dip does not matter, a later hit does
    assert rare.at_target(rows, 0.995) is None
    assert rare.at_target([]) is None
    uncounted = [dict(r, bytes_sent=0) for r in rows]      # a strategy that does not count its traffic
    assert rare.at_target(uncounted)["bytes"] is None


def test_summaries_take_medians_over_the_runs_that_reached_the_target():
    runs = [{"rows": _rows([0.9, 0.96], seconds_per_epoch=s)} for s in (1.0, 3.0, 2.0)]
    runs.append({"rows": _rows([0.9, 0.92])})              # never reached: counted in final accuracy only
    s = rare.summarise(runs)
    assert (s["runs"], s["reached"]) == (4, 3)
    assert s["seconds_to_target"]["median"] == 4.5 and s["seconds_to_target"]["min"] == 2.5
    assert s["bytes_to_target"]["median"] == 2000 and s["steps_to_target"]["median"] == 2 * rare.EPOCH_STEPS
    assert s["final_accuracy"]["median"] == pytest.approx(0.96) and s["final_accuracy"]["min"] == 0.92
    assert rare.summarise([{"rows": _rows([0.5])}])["seconds_to_target"] is None


def test_ratios_are_to_allreduces_median_at_the_same_cap_and_the_best_rare_variant_wins():
    def v(median):
        return {"seconds_to_target": None if median is None else core.summary([median])}
    cap = {"allreduce": v(10.0), "local H=4": v(5.0), "local H=16": v(2.0), "diloco H=16": v(2.5),
           "powersgd r=2": v(1.0), "local H=64": v(None)}
    r = rare.ratios(cap)
    assert r == {"allreduce": 1.0, "local H=4": 0.5, "local H=16": 0.2, "diloco H=16": 0.25,
                 "powersgd r=2": 0.1, "local H=64": None}
    assert rare.best_rare(r) == ("local H=16", 0.2)        # PowerSGD is not a rare-averaging variant
    assert rare.ratios({"allreduce": v(None), "local H=4": v(1.0)})["local H=4"] is None
    assert rare.best_rare({"allreduce": 1.0}) is None


def test_powersgd_bytes_compress_weights_only_when_it_pays():
    # 512 x 512 at rank 2: P and Q, (512 + 512) x 2 floats; biases whole; 2 workers send 1x their bytes
    assert rare.powersgd_step_bytes([(512, 512), (512,)], 2, 2) == 4 * (2048 + 512)
    # 10 x 4 at rank 2 would be (10 + 4) x 2 = 28 floats: under the 2x rate, sent whole
    assert rare.powersgd_step_bytes([(10, 4)], 2, 2) == 4 * 40
    assert rare.powersgd_step_bytes([(10, 4)], 2, 4) == int(1.5 * 4 * 40)
    assert rare.powersgd_step_bytes([(512, 512)], 2, 1) == 0
    assert sum(a * b if len(s) == 2 else a for s in rare.mlp_shapes() for a, b in [(s + (1,))[:2]]) == rare.params()


def test_the_variants_and_the_epoch_divide_as_described():
    v = rare.variants()
    assert list(v)[0] == rare.BASELINE and v[rare.BASELINE] == ["strategy=horovod"]
    for h in rare.LOCAL_H:
        assert rare.EPOCH_STEPS % h == 0 and f"local.sync_every={h}" in v[f"local H={h}"]
    assert "local.outer=nesterov" in v[f"diloco H={rare.DILOCO_H}"]
    assert v[rare.POWERSGD] == ["strategy=ddp", "ddp.comm_hook=powersgd", "ddp.powersgd_rank=2"]
    assert rare.count(core.QUICK) == len(rare.CAPS) * len(v) * rare.repeats(core.QUICK)
    idx = rare.cycled(10, 25, seed=0)
    assert len(idx) == 25 and all(idx.count(i) in (2, 3) for i in range(10)) and idx == rare.cycled(10, 25, seed=0)


def _result(powersgd=True):
    names = [n for n in rare.variants() if powersgd or n != rare.POWERSGD]
    speed = {"allreduce": 8.0, "local H=4": 2.0, "local H=16": 1.0, "local H=64": 0.8, f"diloco H={rare.DILOCO_H}": 1.2,
             rare.POWERSGD: 1.5}
    caps = []
    for cap in rare.CAPS:
        slow = 10.0 if cap else 1.0
        runs = {n: [{"rows": [dict(r, bytes_sent=0 if n == rare.POWERSGD else r["bytes_sent"])
                              for r in _rows([0.9, 0.955, 0.97], seconds_per_epoch=speed[n] * slow * k, start=0.0)]}
                     for k in (1.0, 1.1)] for n in names}
        caps.append({"cap_mbit": cap, "label": rare.cap_label(cap), "measured_mbit": cap or 9000.0, "runs": runs})
    result = {"target": rare.TARGET, "model": "MLP", "params": rare.params(), "bytes": 4 * rare.params(),
              "workers": 2, "batch_per_worker": 16, "epoch_steps": rare.EPOCH_STEPS, "epochs": 3, "repeats": 2,
              "caps": caps, "not_run": {} if powersgd else {rare.POWERSGD: "no keys"},
              "commands": {"allreduce": "ip netns exec x mpirun ..."}}
    return rare.analyse(result)


def test_analysis_finds_the_best_rare_ratio_on_the_capped_link_and_estimates_powersgd_bytes():
    r = _result()
    capped = r["caps"][0]
    assert capped["best_rare"][0] == "local H=64"
    assert r["best_rare_ratio_capped"] == pytest.approx(0.8 / 8.0)
    v = capped["variants"][rare.POWERSGD]
    assert v["bytes_to_target"] is None
    assert v["bytes_to_target_estimated"] == pytest.approx(
        rare.powersgd_step_bytes(rare.mlp_shapes(), 2, 2) * 2 * rare.EPOCH_STEPS)


def test_the_report_has_a_table_per_cap_the_target_the_plot_and_what_was_not_run(tmp_path):
    text = rare.markdown(_result(powersgd=False), tmp_path)
    assert text.count("| variant | s to 95%") == len(rare.CAPS)
    assert "**0.100x** (met)" in text and "powersgd r=2 not run" in text
    assert (tmp_path / "rare_accuracy_wall.png").is_file()
    assert "estimated" in rare.markdown(_result(), tmp_path)
    assert rare.markdown({"skipped": "no root"}, tmp_path) == "Skipped: no root"
