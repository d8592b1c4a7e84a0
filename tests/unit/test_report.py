"""hvd-report on synthetic run dirs in the documented format: every figure and a page that
stands alone, runs side by side, stragglers named, older and partial run dirs, missing ones."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from hvd_trainer.monitor import report
from hvd_trainer.monitor.report_data import STEP_PARTS, load_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ("loss_accuracy.png", "throughput.png", "time_breakdown.png", "memory.png")
STEPS_PER_EPOCH = 56


def _rank(rank: int, epoch: int, slow: bool = False) -> dict:
    data = 0.004 if slow else 0.0002  # a rank waiting for its data
    parts = {"data_s": data, "compute_s": 0.003, "exchange_s": 0.0015, "optimizer_s": 0.0002, "other_s": 0.0001}
    return {"rank": rank, "host": f"node{rank + 1}", "steps": STEPS_PER_EPOCH, "step_s": sum(parts.values()),
            **parts, "eval_s": 0.2, "rss_mb": 300.0 + 5 * epoch + rank, "peak_rss_mb": 320.0 + 5 * epoch + rank,
            "cpu_util": 0.97, "gpu_mb": None, "gpu_peak_mb": None}


def _row(epoch: int, straggler_epochs=(), old: bool = False) -> dict:
    row = {"epoch": epoch, "step": STEPS_PER_EPOCH * epoch, "train_loss": 1.0 / epoch, "lr": 0.1,
           "test_loss": 1.2 / epoch, "test_accuracy": 0.8 + 0.05 * epoch, "samples_per_sec": 1200.0 + epoch,
           "elapsed_s": 3.0 * epoch, "epoch_samples_per_sec": 1300.0 - 10 * epoch}
    if old:
        return row
    slow = epoch in straggler_epochs
    ranks = [_rank(0, epoch), _rank(1, epoch, slow)]
    row["time"] = {k: sum(r[k] for r in ranks) / 2 for k in ("step_s", "eval_s", *(f"{p}_s" for p in STEP_PARTS))}
    row["ranks"] = ranks
    row["stragglers"] = [{"rank": 1, "host": "node2", "part": "data", "ratio": 3.4, "seconds": 0.004,
                          "median": 0.0021}] if slow else []
    return row


def write_run(path: Path, rows: list, summary=None) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def _summary(strategy: str, rows: list) -> dict:
    last = rows[-1]
    return {"strategy": strategy, "world_size": 2, "workers": 2, "epochs": len(rows), "steps": last["step"],
            "samples_per_sec": last["samples_per_sec"], "wall_seconds": last["elapsed_s"] + 0.5,
            "final_train_loss": last["train_loss"], "final_test_accuracy": last["test_accuracy"],
            "final_test_loss": last["test_loss"], "seed": 0, "lr": 0.1,
            "time_breakdown": last["time"], "ranks": last["ranks"],
            "stragglers": [dict(s, epoch=r["epoch"]) for r in rows for s in r["stragglers"]]}


@pytest.fixture
def two_runs(tmp_path):
    slow_rows = [_row(e, straggler_epochs=(2,)) for e in (1, 2, 3)]
    even_rows = [_row(e) for e in (1, 2, 3)]
    return (write_run(tmp_path / "hvd-run", slow_rows, _summary("horovod", slow_rows)),
            write_run(tmp_path / "ddp-run", even_rows, _summary("ddp", even_rows)))


def test_two_runs_give_every_figure_and_a_page_that_embeds_them(two_runs, capsys):
    slow, even = two_runs
    assert report.main([str(slow), str(even)]) == 0
    out = slow / "report"  # the default: the first run dir's report/
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / f) for f in FIGURES] + [str(out / "report.html")]
    page = (out / "report.html").read_text()
    for name in FIGURES:
        png = (out / name).read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 10_000
        assert "data:image/png;base64," + base64.b64encode(png).decode() in page  # the page alone suffices
    assert "<img" in page and 'src="report' not in page and ".png\"" not in page  # no link to a file
    assert "hvd-run" in page and "ddp-run" in page and "horovod" in page


def test_the_page_names_the_straggler_in_its_own_run_only(two_runs, tmp_path):
    slow, even = two_runs
    assert report.main([str(slow), str(even), "--out", str(tmp_path / "cmp")]) == 0
    page = (tmp_path / "cmp" / "report.html").read_text()
    sections = re.findall(r'<div class="stragglers" id="stragglers-\d">(.*?)</div>', page, re.S)
    assert len(sections) == 2
    assert "epoch 2: rank 1 on node2: data 3.40x the median" in sections[0]
    assert "Straggler warnings (0)" in sections[1] and "rank 1" not in sections[1]


def test_the_breakdown_is_a_share_of_the_step_and_matches_the_rows(tmp_path):
    rows = [_row(1), _row(2, straggler_epochs=(2,))]
    run = load_run(write_run(tmp_path / "r", rows))
    parts = run.breakdown()  # no summary: the rows' mean, weighted by their steps (equal here)
    for p in STEP_PARTS:
        assert parts[p] == pytest.approx((rows[0]["time"][f"{p}_s"] + rows[1]["time"][f"{p}_s"]) / 2)
    assert sum(run.breakdown_percent().values()) == pytest.approx(100.0)
    assert run.stragglers() == [dict(rows[1]["stragglers"][0], epoch=2)]


def test_an_older_run_without_times_or_summary_still_gives_loss_and_accuracy(tmp_path, capsys):
    old = write_run(tmp_path / "old", [_row(e, old=True) for e in (1, 2)])
    assert report.main([str(old)]) == 0
    out = old / "report"
    assert (out / "loss_accuracy.png").read_bytes().startswith(PNG_MAGIC)
    assert (out / "throughput.png").read_bytes().startswith(PNG_MAGIC)
    assert not (out / "time_breakdown.png").exists() and not (out / "memory.png").exists()
    page = (out / "report.html").read_text()
    assert "no summary.json" in page and "not recorded" in page
    assert "90.00" in page  # the final accuracy taken from the last row


def test_a_partial_metrics_file_skips_the_cut_line_and_keeps_the_later_of_a_repeated_step(tmp_path):
    rows = [_row(1), _row(2)]
    path = write_run(tmp_path / "live", rows)
    again = dict(_row(2), train_loss=0.123)  # the same step written again after a resume
    with open(path / "metrics.jsonl", "a") as f:
        f.write(json.dumps(again) + "\n" + json.dumps(_row(3))[:40])  # a run still writing
    run = load_run(path)
    assert [r["step"] for r in run.rows] == [56, 112] and run.rows[-1]["train_loss"] == 0.123
    assert any("1 unreadable line" in n for n in run.notes)


def test_an_old_run_beside_a_new_one_gets_an_empty_breakdown_panel(two_runs, tmp_path):
    old = write_run(tmp_path / "old", [_row(e, old=True) for e in (1, 2)])
    assert report.main([str(two_runs[0]), str(old), "--out", str(tmp_path / "mix")]) == 0
    assert (tmp_path / "mix" / "time_breakdown.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("make", [lambda p: p / "nope", lambda p: (p / "empty").mkdir() or p / "empty"])
def test_a_missing_run_dir_or_metrics_file_is_one_line_naming_it_and_exit_2(two_runs, tmp_path, capsys, make):
    bad = make(tmp_path)
    assert report.main([str(two_runs[0]), str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and err[0].startswith("hvd-report: ")
    assert not (two_runs[0] / "report").exists()  # nothing written for a half-valid list
