"""The one-file HTML page of ``hvd-report``: each run's key figures and straggler warnings, and
the PNGs embedded as data URIs, so the page alone can be mailed or attached to a ticket."""
from __future__ import annotations

import base64
import html
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from .report_data import STEP_PARTS, Run, number

STYLE = """body{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}.straggler{color:#b00}.note{color:#666}
img{max-width:100%}figure{margin:1.5em 0}figcaption{font-style:italic}"""


def _fmt(value: Optional[float], spec: str) -> str:
    return "–" if value is None else format(value, spec)


def data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode("ascii")


def key_figures(run: Run) -> list[tuple[str, str]]:
    """(label, value) rows of the run's table; "–" where the run did not record the figure."""
    s = run.summary
    last = run.rows[-1]
    accuracy = run.final("final_test_accuracy", "test_accuracy")
    figures = [("strategy", str(s.get("strategy", "–"))),
               ("world size", str(s.get("world_size", len(last.get("ranks") or []) or "–"))),
               ("epochs", _fmt(number(s.get("epochs")) or number(last.get("epoch")), ".0f")),
               ("steps", _fmt(run.final("steps", "step"), ".0f")),
               ("final test accuracy, %", _fmt(None if accuracy is None else 100 * accuracy, ".2f")),
               ("final train loss", _fmt(run.final("final_train_loss", "train_loss"), ".4f")),
               ("samples/s", _fmt(run.final("samples_per_sec", "samples_per_sec"), ".1f")),
               ("wall, s", _fmt(run.final("wall_seconds", "elapsed_s"), ".1f"))]
    parts, percent = run.breakdown(), run.breakdown_percent()
    if parts and percent:
        figures.append(("step time, ms (mean)", _fmt(1000 * sum(parts.values()), ".2f")))
        figures += [(f"{p}, % of step", _fmt(percent[p], ".1f")) for p in STEP_PARTS]
    else:
        figures.append(("time breakdown", "not recorded"))
    return figures


def straggler_text(s: dict[str, Any]) -> str:
    """One warning in words; fields an older or partial record lacks are left out."""
    where = f"epoch {s['epoch']}: " if s.get("epoch") is not None else ""
    host = f" on {s['host']}" if s.get("host") else ""
    ratio = number(s.get("ratio"))
    how = f"{ratio:.2f}x the median" if ratio is not None else "far above the median" if "ratio" in s else ""
    seconds, median = number(s.get("seconds")), number(s.get("median"))
    times = f" ({1000 * seconds:.1f} ms/step against {1000 * median:.1f} ms)" \
        if seconds is not None and median is not None else ""
    return f"{where}rank {s.get('rank', '?')}{host}: {s.get('part', '?')} {how}{times}".rstrip()


def _run_section(i: int, run: Run) -> list[str]:
    e = html.escape
    out = [f'<section class="run" id="run-{i}"><h3>{e(run.name)}</h3>', f"<p class=note>{e(str(run.path))}</p>",
           "<table>"]
    out += [f"<tr><th>{e(label)}</th><td class=n>{e(value)}</td></tr>" for label, value in key_figures(run)]
    out.append("</table>")
    out += [f"<p class=note>{e(note)}</p>" for note in run.notes]
    warnings = run.stragglers()
    out.append(f'<div class="stragglers" id="stragglers-{i}"><h4>Straggler warnings ({len(warnings)})</h4>')
    if warnings:
        out += ["<ul>"] + [f"<li class=straggler>{e(straggler_text(s))}</li>" for s in warnings] + ["</ul>"]
    else:
        out.append("<p class=note>none recorded</p>")
    out.append("</div></section>")
    return out


def page(runs: Sequence[Run], figures: Sequence[tuple[str, Path]], missing: Sequence[str] = ()) -> str:
    """The whole page: ``figures`` are (caption, PNG path) in order; ``missing`` the captions of
    the figures no run had data for."""
    e = html.escape
    names = ", ".join(run.name for run in runs)
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>hvd-report: {e(names)}</title><style>{STYLE}</style></head><body>",
           f"<h1>hvd-report: {e(names)}</h1>",
           f"<p class=note>made {e(time.strftime('%Y-%m-%d %H:%M:%S'))} from {len(runs)} run dir(s)</p>",
           "<h2>Runs</h2>"]
    for i, run in enumerate(runs):
        out += _run_section(i, run)
    out.append("<h2>Figures</h2>")
    for caption, png in figures:
        out.append(f'<figure><img alt="{e(caption)}" src="{data_uri(png)}">'
                   f"<figcaption>{e(caption)}</figcaption></figure>")
    out += [f"<p class=note>{e(c)}: no data in these runs</p>" for c in missing]
    out.append("</body></html>")
    return "\n".join(out) + "\n"
