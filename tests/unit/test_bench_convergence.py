"""hvd-bench's convergence section without MPI: time to target, the variants' rank counts, and
its report on a synthetic result (the table, both plots, the commands)."""
from benchmarks import convergence, core


def _rows(accs, seconds_per_epoch=1.0, start=2.0):
    return [{"epoch": e, "step": 10 * e, "elapsed_s": start + seconds_per_epoch * e, "test_accuracy": a,
             "train_loss": 1.0 / e} for e, a in enumerate(accs, 1)]


def test_time_to_target_is_the_first_epoch_end_at_or_above_it():
    rows = _rows([0.5, 0.94, 0.95, 0.93, 0.99])
    assert convergence.to_target(rows) == (3, 5.0)            # exactly the target counts
    assert convergence.to_target(rows, 0.99) == (5, 7.0)
    assert convergence.to_target(rows, 0.995) == (None, None)  # never reached
    assert convergence.to_target([]) == (None, None)


def test_every_variant_runs_its_workers_plus_one_server_and_sync_steps_average_two():
    assert convergence.workers("allreduce") == 2 == convergence.VARIANTS["allreduce"][0]
    for name, (np, overrides) in convergence.VARIANTS.items():
        if "strategy=ps" in overrides:
            assert np == convergence.workers(name) + 1
            backups = sum(int(o.split("=")[1]) for o in overrides if o.startswith("ps.backup_workers="))
            if "ps.mode=sync" in overrides:  # the global batch of one step: 2 workers' gradients
                assert convergence.workers(name) - backups == 2
    assert convergence.count(core.QUICK) == len(convergence.VARIANTS) * convergence.repeats(core.QUICK)


def _result():
    variants = {}
    for i, name in enumerate(convergence.VARIANTS):
        np, overrides = convergence.VARIANTS[name]
        runs = [{"rows": _rows([0.8, 0.9 + 0.01 * i, 0.96 - 0.01 * i]), "ps": {}, "job_s": 5.0 + r}
                for r in range(2)]
        hits = [convergence.to_target(x["rows"]) for x in runs]
        variants[name] = {
            "ranks": np, "workers": convergence.workers(name), "overrides": overrides,
            "commands": [f"mpirun -np {np} python -m benchmarks.convergence --job ({name})"], "runs": runs,
            "final_accuracy": core.summary([x["rows"][-1]["test_accuracy"] for x in runs]),
            "final_train_loss": core.summary([x["rows"][-1]["train_loss"] for x in runs]),
            "train_s": core.summary([x["rows"][-1]["elapsed_s"] for x in runs]),
            "job_s": core.summary([x["job_s"] for x in runs]),
            "epochs_to_target": convergence._maybe_summary([e for e, _ in hits]),
            "seconds_to_target": convergence._maybe_summary([s for _, s in hits]),
            "reached": sum(e is not None for e, _ in hits)}
    variants["ps-sync"]["dropped_gradients"] = core.summary([0, 0])
    return {"target": 0.95, "epochs": 3, "repeats": 2, "variants": variants}


def test_markdown_writes_both_plots_and_one_table_row_per_variant(tmp_path):
    result = _result()
    text = convergence.markdown(result, tmp_path)
    for png in ("convergence_epochs.png", "convergence_wall.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](plots/{png})" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(convergence.VARIANTS)   # header + one per variant
    by_name = {r.split(" | ")[0][2:]: r for r in rows[1:]}
    assert set(by_name) == set(convergence.VARIANTS)
    assert "| 96.00 [96.00..96.00] |" in by_name["allreduce"]
    assert "| 3 [3..3] | 5.0 [5.0..5.0] |" in by_name["allreduce"]  # reached at epoch 3, 5 s in
    assert "not reached" in by_name["ps-ssp"]           # 0.93 at the end: never 95%
    for v in result["variants"].values():
        assert v["commands"][0] in text


def test_variants_with_equal_curves_are_named_together():
    result = _result()
    result["variants"]["ps-sync"]["runs"][0]["rows"] = result["variants"]["allreduce"]["runs"][0]["rows"]
    assert convergence.coinciding(result) == [["allreduce", "ps-sync"]]


def test_fmt_shows_the_spread_and_how_many_runs_reached_it():
    assert convergence._fmt(None, ".1f", 2) == "not reached"
    assert convergence._fmt(core.summary([2.0]), ".1f", 1) == "2.0"
    assert convergence._fmt(core.summary([3.0]), ".1f", 2) == "3.0 (1/2 runs)"
    assert convergence._fmt(core.summary([1.0, 3.0]), ".1f", 2) == "2.0 [1.0..3.0]"


def test_every_variant_is_a_valid_trainer_config_once_the_benchs_own_overrides_are_taken_out():
    from hvd_trainer import load_config

    for name, (_, overrides) in convergence.VARIANTS.items():
        load_config("digits", [o for o in overrides if not o.startswith("bench.")])  # raises on a bad key
    assert any(o.startswith("bench.straggler_ms=") for o in convergence.VARIANTS["ps-sync+straggler"][1])


def test_the_straggler_sleeps_in_training_steps_only(monkeypatch):
    import torch

    slept = []
    monkeypatch.setattr(convergence.time, "sleep", slept.append)
    loss_fn = convergence.straggler_loss(20.0)
    logits, y = torch.randn(4, 3, requires_grad=True), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():  # as the trainer's evaluation calls it
        loss_fn(logits, y)
    assert slept == []
    assert torch.equal(loss_fn(logits, y), torch.nn.functional.cross_entropy(logits, y))
    assert slept == [0.02]
