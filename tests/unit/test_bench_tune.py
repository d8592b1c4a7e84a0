"""hvd-bench's tune section without MPI: the study files it runs are valid, and trials per hour,
the packing ratio and the search comparison come out right on synthetic journals."""
import pytest

from benchmarks import core, tune


def _trial(number, start, end, state="COMPLETE", value=0.9, steps=100, **params):
    return {"number": number, "state": state, "value": value if state == "COMPLETE" else None, "steps": steps,
            "epochs": 1, "start": start, "end": end, "params": params}


def test_the_study_files_load_and_their_base_is_a_training_config(tmp_path):
    import yaml

    from hvd_trainer.config import from_dict
    from hvd_trainer.tune.space import trial_tree
    from hvd_trainer.tune.study import load_study

    for i, doc in enumerate([tune.pack_study(), tune.search_study(None), tune.search_study(3)]):
        path = tmp_path / f"{i}.yaml"
        path.write_text(yaml.safe_dump({**doc, "dir": str(tmp_path / str(i))}))
        cfg, base_dir = load_study(str(path), {})
        from_dict(trial_tree(cfg, base_dir, {}, tmp_path / "run"))
        assert cfg.ranks_per_trial == 1
    grid, _ = load_study(str(tmp_path / "1.yaml"), {})
    assert grid.sampler == "grid" and grid.pruner == "none" and grid.trial_count() == tune.grid_size(tune.SEARCH_SPACE) == 30
    searched, _ = load_study(str(tmp_path / "2.yaml"), {})
    assert (searched.sampler, searched.pruner, searched.seed, searched.trial_count()) == ("tpe", "asha", 3, tune.SEARCH_TRIALS)
    packed, _ = load_study(str(tmp_path / "0.yaml"), {})
    assert packed.trial_count() == tune.PACK_TRIALS == tune.grid_size(tune.PACK_SPACE)  # every point, equal steps
    assert "batch_size" not in tune.PACK_SPACE and tune.count(core.QUICK) == 2 * 3 + 1 + 3


def test_trials_per_hour_come_from_the_journals_span():
    trials = [_trial(0, 100.0, 110.0), _trial(1, 100.5, 111.0), _trial(2, 110.0, 118.0)]
    assert tune.span_s(trials) == 18.0
    assert tune.per_hour(trials) == pytest.approx(3600 * 3 / 18)


def test_packing_is_taken_round_by_round_and_as_a_share_of_g():
    def job(span, wall):
        return {"trials": [_trial(0, 0.0, span / 2), _trial(1, span / 2, span)], "wall_s": wall}
    pairs = [(job(10.0, 14.0), job(18.0, 22.0)), (job(12.0, 16.0), job(18.0, 22.0)), (job(9.0, 13.0), job(18.0, 22.0))]
    out = tune.packing(pairs, groups=2)
    assert out["ratio"]["median"] == pytest.approx(1.8) and out["ratio"]["min"] == pytest.approx(1.5)
    assert out["share_of_g"]["max"] == pytest.approx(1.0) and out["rounds"] == 3
    assert out["wall_s"]["one"]["median"] == 22.0


def test_the_search_is_judged_by_its_best_complete_trial_and_all_its_steps():
    grid = [_trial(i, 0, 1, value=v, steps=100, lr=i) for i, v in enumerate([0.90, 0.98, 0.95])]
    near = [_trial(0, 0, 1, value=0.976, steps=50), _trial(1, 0, 1, state="PRUNED", steps=10),
            _trial(2, 0, 1, state="PRUNED", value=0.99, steps=10)]  # a pruned trial's value never counts
    far = [_trial(0, 0, 1, value=0.95, steps=20), _trial(1, 0, 1, state="FAIL", steps=0)]
    out = tune.search(grid, {0: near, 1: far})
    assert out["grid"] == {"trials": 3, "steps": 300, "best": 0.98, "best_params": {"lr": 1}}
    assert out["seeds"][0]["gap_pp"] == pytest.approx(0.4) and out["seeds"][0]["steps_ratio"] == pytest.approx(70 / 300)
    assert out["seeds"][0]["pruned"] == 2 and out["seeds"][1]["complete"] == 1
    assert out["worst_gap_pp"] == pytest.approx(3.0) and out["met"] == 1


def test_a_study_with_no_complete_trial_has_no_gap():
    grid = [_trial(0, 0, 1, value=0.9)]
    out = tune.search(grid, {0: [_trial(0, 0, 1, state="PRUNED")]})
    assert out["seeds"][0]["best"] is None and out["gap_pp"] is None and out["met"] == 0


def test_the_report_states_both_comparisons(tmp_path):
    grid = [_trial(i, 0, 1, value=v, steps=100, lr=i) for i, v in enumerate([0.90, 0.98])]
    pairs = [({"trials": [_trial(0, 0, 5), _trial(1, 0, 5)], "wall_s": 9.0},
              {"trials": [_trial(0, 0, 5), _trial(1, 5, 10)], "wall_s": 14.0})]
    result = {"pack": {**tune.packing(pairs)},
              "search": {"space": tune.SEARCH_SPACE, "epochs": 12, "trials": 16, "study": tune.SEARCH_STUDY,
                         **tune.search(grid, {0: [_trial(0, 0, 1, value=0.98, steps=40)]})}}
    text = tune.markdown(result, tmp_path)
    assert "2.00x, 1.00 of g = 2" in text
    assert "| asha+tpe seed 0 | 98.00 | +0.00 | 40 | 0.20 | 1 | 0 |" in text
    assert "1 of 1; gap +0.00 pp, steps 0.20x of the grid's (worst seed: +0.00 pp, 0.20x)" in text
