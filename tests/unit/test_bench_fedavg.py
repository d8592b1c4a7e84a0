"""hvd-bench's fedavg section without MPI: the variants, rounds to target, the paired shortfall
and FedProx's recovery in closed form, and the report on a synthetic result."""
import pytest

from benchmarks import core, fedavg

IID5, NON5, IID1 = fedavg.label(None, 5), fedavg.label(0.1, 5), fedavg.label(None, 1)


def _runs(curves):
    return [{"seed": s, "accuracy": c, "bytes_sent": 1000 * len(c), "train_s": 0.1 * len(c)}
            for s, c in enumerate(curves)]


def test_every_alpha_at_every_e_then_fedprox_at_each_mu():
    v = fedavg.variants()
    assert len(v) == len(fedavg.ALPHAS) * len(fedavg.LOCAL_EPOCHS) + len(fedavg.MUS)
    assert v[IID1] == ["fedavg.local_epochs=1"]  # IID: no alpha at all
    assert v[fedavg.label(0.1, 5)] == ["fedavg.local_epochs=5", "fedavg.alpha=0.1"]
    for mu in fedavg.MUS:
        assert v[fedavg.label(fedavg.PROX_ALPHA, fedavg.PROX_E, mu)][-1] == f"fedavg.mu={mu:g}"
    assert fedavg.count(core.QUICK) == len(fedavg.seeds(core.QUICK))  # one job per seed
    assert fedavg.params() == 64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
    assert round(fedavg.CLIENTS * fedavg.FRACTION) % fedavg.WORKERS == 0  # no padding step in a round


def test_the_base_config_loads_with_every_variant():
    from hvd_trainer import load_config

    for overrides in fedavg.variants().values():
        cfg = load_config(None, [*fedavg.BASE, "epochs=2", "seed=1", *overrides])
        assert cfg.strategy == "fedavg" and cfg.fedavg.clients == fedavg.CLIENTS


def test_rounds_to_target_tail_mean_and_bytes_per_round():
    acc = [0.5, 0.9, 0.85, 0.95]
    assert fedavg.rounds_to(acc) == 2                  # rounds count from 1; exactly the target counts
    assert fedavg.rounds_to(acc, 0.96) is None
    assert fedavg.tail_mean(acc, 2) == pytest.approx(0.9) and fedavg.final(acc) == 0.95
    assert fedavg.tail_mean(acc[:1], 5) == 0.5         # fewer rounds than the tail: all of them
    assert fedavg.bytes_per_round({"accuracy": acc, "bytes_sent": 4 * 137_816}) == 137_816
    assert fedavg.bytes_per_round({"accuracy": acc, "bytes_sent": None}) is None


def test_the_shortfall_is_paired_by_seed():
    runs = {name: _runs([[0.9] * 5, [0.8] * 5]) for name in fedavg.variants()}
    runs[IID5] = _runs([[0.95] * 5, [0.9] * 5])   # +5 and +10 points over every other variant
    gaps = fedavg.shortfalls(runs)
    assert set(gaps) == {fedavg.label(a, e) for a in fedavg.ALPHAS[1:] for e in fedavg.LOCAL_EPOCHS}
    assert gaps[NON5]["final_pp"]["values"] == pytest.approx([5.0, 10.0])
    assert gaps[fedavg.label(0.1, 1)]["tail_pp"]["values"] == pytest.approx([0.0, 0.0])
    shuffled = dict(runs, **{NON5: list(reversed(runs[NON5]))})
    with pytest.raises(ValueError, match="paired"):
        fedavg.shortfalls(shuffled)


def test_fedprox_recovery_and_the_share_of_the_gap_it_closes():
    runs = {name: _runs([[0.9] * 5, [0.9] * 5]) for name in fedavg.variants()}
    runs[NON5] = _runs([[0.8] * 5, [0.8] * 5])    # a 10-point IID gap
    half, full, worse = (fedavg.label(fedavg.PROX_ALPHA, fedavg.PROX_E, mu) for mu in fedavg.MUS)
    runs[half] = _runs([[0.85] * 5, [0.85] * 5])
    runs[worse] = _runs([[0.75] * 5, [0.75] * 5])
    rec = fedavg.recovery(runs)
    assert rec[half]["tail_pp"]["median"] == pytest.approx(5.0) and rec[half]["share_of_gap"] == pytest.approx(0.5)
    assert rec[full]["share_of_gap"] == pytest.approx(1.0)
    assert rec[worse]["share_of_gap"] == pytest.approx(-0.5)
    runs[NON5] = runs[IID5]                        # no gap: no share to state
    assert all(r["share_of_gap"] is None for r in fedavg.recovery(runs).values())


def _result(rounds=6):
    curves = {}
    for name in fedavg.variants():
        hard = 0.2 if "alpha=0.1 E=1" in name else 0.1 if "alpha=0.1" in name else 0.0
        prox = 0.03 if "fedprox" in name else 0.0
        curves[name] = [[min(0.97, 0.6 + 0.08 * r - hard + prox + 0.01 * s) for r in range(rounds)] for s in range(2)]
    result = {"target": fedavg.TARGET, "model": "MLP 64-128-64-10", "params": fedavg.params(), "workers": 2,
              "clients": fedavg.CLIENTS, "fraction": fedavg.FRACTION, "batch": fedavg.BATCH, "rounds": rounds,
              "seeds": [0, 1], "tail": fedavg.TAIL, "overrides": fedavg.variants(),
              "runs": {n: _runs(c) for n, c in curves.items()}, "commands": ["mpirun -np 2 python -m benchmarks.fedavg"]}
    return fedavg.analyse(result)


def test_markdown_has_every_table_the_findings_and_the_plot(tmp_path):
    result = _result()
    text = fedavg.markdown(result, tmp_path)
    assert (tmp_path / "fedavg_rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](plots/fedavg_rounds.png)" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    names = [r.split(" | ")[0][2:] for r in rows]
    assert names.count("variant") == 3
    assert set(fedavg.variants()) <= set(names)
    assert "not in 6" in text                        # alpha = 0.1 at E = 1 never reaches 90% here
    assert "| 1.0 |" in text                        # bytes per rank and round, in KB
    assert "recovers some of the gap on every seed" in text


def test_findings_say_when_fedprox_recovers_nothing():
    result = _result()
    for r in result["recovery"].values():
        r["tail_pp"] = core.summary([-1.0, -2.0])
    assert "recovers none of the gap" in fedavg.findings(result)[-1]


def test_the_target_is_the_best_fedprox_gain_over_fedavg():
    from benchmarks import modelcheck

    results = {"sections": {"fedavg": _result()}}
    table = modelcheck.targets_markdown(results, modelcheck.evaluate(results))
    row = next(line for line in table.splitlines() if "best FedProx gain" in line)
    assert "| 3.000 | > 0.0 | yes |" in row
    assert "not measured" in next(line for line in modelcheck.targets_markdown({}, {}).splitlines()
                                  if "best FedProx gain" in line)
