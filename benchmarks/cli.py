"""``hvd-bench``: which gradient exchange is fastest here, measured side by side in one run.

    hvd-bench --quick                      # <= 15 min on 2 cores: every section, short sweeps
    hvd-bench --full                       # longer sweeps, more repeats
    hvd-bench --quick --only collectives   # some sections (the others' results in --out are kept)
    hvd-bench --quick --only monitoring    # what TensorBoard and the Prometheus sink cost the trainer
    hvd-bench --quick --only pipeline      # pipeline stages on the transformer: bubble, memory, convergence
    hvd-bench --quick --only rare          # local SGD, DiLoCo, PowerSGD: time to target on capped links
    hvd-bench --quick --only fedavg        # FedAvg over non-IID clients: accuracy against rounds, FedProx
    hvd-bench --report-only --out DIR      # redraw the report and plots from DIR/results.json
    hvd-bench --advise --params 25.6e6 --workers 64 --link-gbit 25 [--sync-every 4,16,64]

Writes ``results.json`` (after every section, so an interrupted run keeps what it measured),
``REPORT.md`` and ``plots/*.png`` into ``--out`` (default ``bench-results/``). The repository's
``benchmarks/REPORT.md`` is this command's output with ``--out benchmarks``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

from . import core, costmodel, modelcheck


class _Sections(dict):
    """name -> section module, imported on first use (a report needs matplotlib, --advise not)."""

    def __missing__(self, name: str):
        self[name] = importlib.import_module(f"{__package__}.{MODULES.get(name, name)}")
        return self[name]


SECTION_NAMES = ("collectives", "throughput", "links", "convergence", "monitoring", "pipeline", "rare", "fedavg", "tune")
# a section whose module is named otherwise (benchmarks/pipeline.py is the data pipeline's)
MODULES = {"pipeline": "pipeline_parallel"}
SECTIONS = _Sections()


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hvd-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    m = p.add_mutually_exclusive_group()
    m.add_argument("--quick", action="store_const", dest="mode", const="quick", help="short sweeps (default)")
    m.add_argument("--full", action="store_const", dest="mode", const="full", help="long sweeps, more repeats")
    p.add_argument("--out", default="bench-results", help="results folder (default: %(default)s)")
    p.add_argument("--only", default="", help=f"comma-separated sections of {','.join(SECTION_NAMES)}")
    p.add_argument("--report-only", action="store_true", help="only redraw REPORT.md and plots from results.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.add_argument_group("--advise: the model's prediction for your cluster")
    a.add_argument("--advise", action="store_true")
    a.add_argument("--params", type=float, default=costmodel.RESNET50_PARAMS, help="model parameters (fp32)")
    a.add_argument("--workers", type=int, default=64)
    a.add_argument("--link-gbit", type=float, help="link bandwidth, Gbit/s (default: calibrated here)")
    a.add_argument("--alpha-us", type=float, help="per-message latency, µs (default: calibrated here)")
    a.add_argument("--compute-ms", type=float, help="one worker's compute per step, ms (default: measured here)")
    a.add_argument("--activation-mb", type=float,
                   help="activation at one pipeline cut for one worker's batch, MB (batch x seq_len x width x 4): "
                        "also rank pipeline depths")
    a.add_argument("--microbatches", type=int, default=8, help="microbatches per step with pipeline stages")
    a.add_argument("--sync-every", default="4,16,64",
                   help="local SGD: steps between averagings H, comma-separated (default: %(default)s)")
    args = p.parse_args(argv)
    args.mode = args.mode or "quick"
    unknown = [s for s in filter(None, args.only.split(",")) if s not in SECTION_NAMES]
    if unknown:
        p.error(f"--only: unknown section {unknown[0]!r} (choose from {', '.join(SECTION_NAMES)})")
    if args.workers < 1 or args.params <= 0 or args.microbatches < 1:
        p.error("--workers, --params and --microbatches must be positive")
    try:
        args.sync_every = [int(h) for h in args.sync_every.split(",") if h.strip()]
    except ValueError:
        p.error(f"--sync-every: comma-separated integers, got {args.sync_every!r}")
    if any(h < 1 for h in args.sync_every):
        p.error("--sync-every: every H must be >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    out = Path(args.out)
    if args.advise:
        return advise(args, out / "results.json")
    results_path = out / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if not args.report_only:
        results = measure(args, out, results)
    if not results.get("sections"):
        print(f"hvd-bench: no results in {results_path}", file=sys.stderr)
        return 2
    write_report(results, out)
    print(f"hvd-bench: {out / 'REPORT.md'}, {out / 'results.json'}, {out / 'plots'}/")
    return 0


def measure(args: argparse.Namespace, out: Path, results: dict[str, Any]) -> dict[str, Any]:
    from tqdm import tqdm

    mode = core.MODES[args.mode]
    chosen = [s for s in filter(None, args.only.split(","))] or list(SECTION_NAMES)
    out.mkdir(parents=True, exist_ok=True)
    results.setdefault("sections", {})
    results["machine"] = core.machine()
    total = sum(SECTIONS[s].count(mode) for s in chosen)
    bar = None if args.no_progress else tqdm(total=total, unit="job", desc=f"hvd-bench --{mode.name}", file=sys.stderr)
    bench = core.Bench(mode=mode, out=out, progress=bar)
    try:
        for name in chosen:
            t0 = time.monotonic()
            bench.log(f"[{name}] {SECTIONS[name].TITLE}")
            try:
                res = SECTIONS[name].run(bench)
            except core.BenchError as err:  # one failing section does not lose the others
                bench.log(f"[{name}] FAILED: {err}")
                res = {"failed": str(err)[:4000]}
            res["meta"] = {"mode": mode.name, "seconds": time.monotonic() - t0, "cpu": results["machine"].get("cpu"),
                           "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(["hvd-bench", *sys.argv[1:]])}
            results["sections"][name] = res
            (out / "results.json").write_text(json.dumps(results, indent=1))
    finally:
        bench.close()
        if bar is not None:
            bar.close()
    return results


def write_report(results: dict[str, Any], out: Path) -> None:
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    secs = results["sections"]
    check = modelcheck.evaluate(results)
    m = results.get("machine", {})
    parts = ["# Benchmark report", "",
             "Generated by `hvd-bench` (`benchmarks/cli.py`) from `results.json`; do not edit by hand.", "",
             f"Machine: {m.get('cpu', '?')}, {m.get('affinity', '?')} usable cores, {m.get('mem_gib', '?')} GiB; "
             f"{m.get('platform', '')}; Python {m.get('python')}, torch {m.get('torch')}, numpy {m.get('numpy')}, "
             f"mpi4py {m.get('mpi4py')}, Horovod {m.get('horovod')}, {m.get('mpi')} (the last run's; each "
             "section's CPU is in the table below).", "",
             "Every figure is a median of repeats after warm-up, with its spread; ratios compare figures "
             "measured side by side in one run (jobs alternate in rounds). One thread per rank.", "",
             "| section | mode | run on | CPU | wall time | command |", "|---|---|---|---|---|---|"]
    for name, res in secs.items():
        meta = res.get("meta", {})
        parts.append(f"| {name} | {meta.get('mode')} | {meta.get('date')} | {meta.get('cpu', '?')} | "
                     f"{meta.get('seconds', 0) / 60:.1f} min | "
                     f"`{meta.get('command')}` |")
    parts += ["", "## Targets", "", modelcheck.targets_markdown(results, check), ""]
    for i, name in enumerate(SECTION_NAMES, 1):
        mod, res = SECTIONS[name], secs.get(name)
        parts += [f"## {i}. {mod.TITLE}", ""]
        if res is None:
            parts += ["Not measured in this report.", ""]
        elif "failed" in res:
            parts += ["This section failed:", "", "```", res["failed"][-2000:], "```", ""]
        elif "skipped" in res:
            parts += [f"Skipped: {res['skipped']}", ""]
        else:
            parts += [mod.markdown(res, plots), ""]
    parts += [f"## {len(SECTION_NAMES) + 1}. {modelcheck.TITLE}", "", modelcheck.markdown(check, plots), ""]
    (out / "REPORT.md").write_text("\n".join(parts))


def advise(args: argparse.Namespace, results_path: Path) -> int:
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    cal = modelcheck.evaluate(results) if results.get("sections") else {}
    link = cal.get("links", {}).get("mpi")
    alpha = args.alpha_us * 1e-6 if args.alpha_us is not None else (link["alpha_s"] if link else 5e-6)
    if args.link_gbit is not None:
        bandwidth = args.link_gbit * costmodel.GBIT
    elif link:
        bandwidth = link["bandwidth"]
    else:
        print("hvd-bench --advise: give --link-gbit, or run hvd-bench first to measure the link "
              f"(no {results_path})", file=sys.stderr)
        return 2
    compute = args.compute_ms / 1e3 if args.compute_ms is not None else cal.get("compute_s")
    if compute is None:
        print("hvd-bench --advise: give --compute-ms, or run hvd-bench first to measure compute", file=sys.stderr)
        return 2
    rows = costmodel.advise(args.params, args.workers, costmodel.Link(alpha, bandwidth), compute)
    print(f"{args.params / 1e6:.1f}M parameters (fp32, {args.params * 4 / 1e6:.0f} MB of gradient), "
          f"{args.workers} workers, link {bandwidth / costmodel.GBIT:.2f} Gbit/s, alpha {alpha * 1e6:.1f} µs, "
          f"compute {compute * 1e3:.1f} ms/step")
    print(f"{'strategy':<9} {'knobs':<48} {'exchange':>10} {'step':>10} {'efficiency':>10} {'vs best':>8}")
    for r in rows:
        print(f"{r['strategy']:<9} {r['knobs']:<48} {costmodel.fmt_seconds(r['comm_s']):>10} "
              f"{costmodel.fmt_seconds(r['step_s']):>10} {r['efficiency']:>10.1%} {r['vs_best']:>7.2f}x")
    best, second = rows[0], rows[1]
    print(f"fastest: {best['strategy']} ({best['knobs']}), {second['step_s'] / best['step_s']:.2f}x faster "
          f"than the next ({second['strategy']}, {second['knobs']})")
    if args.sync_every:
        advise_local_sgd(args, costmodel.Link(alpha, bandwidth), compute)
    if args.activation_mb is not None:
        advise_pipeline(args, costmodel.Link(alpha, bandwidth), compute)
    return 0


def advise_local_sgd(args: argparse.Namespace, link: "costmodel.Link", compute: float) -> None:
    """Local SGD's time per step against the synchronous ring (not ranked with the others: the
    model cannot say what H local steps cost in accuracy)."""
    rows = costmodel.advise_local_sgd(args.params, args.workers, link, compute, args.sync_every)
    print("\nstrategy=local_sgd: parameters averaged every H steps (ring, after the step), against the ring "
          "every step (fp32, overlapped with backward)")
    print(f"{'H':>5} {'exchange/step':>14} {'step':>10} {'bytes/step':>12} {'speedup':>8}")
    for r in rows:
        print(f"{r['sync_every']:>5} {costmodel.fmt_seconds(r['comm_s']):>14} {costmodel.fmt_seconds(r['step_s']):>10} "
              f"{r['bytes_per_step'] / 1e6:>9.2f} MB {r['speedup']:>7.2f}x")
    print("time per step only: H local steps may need more steps, or reach less, than synchronous SGD "
          "(hvd-bench --only rare measures time to a target accuracy)")


def advise_pipeline(args: argparse.Namespace, link: "costmodel.Link", compute: float) -> None:
    """Pipeline depths at the same global batch (Horovod's ring among each stage's replicas)."""
    rows = costmodel.advise_pipeline(args.params, args.workers, link, compute, args.activation_mb * 1e6,
                                     args.microbatches)
    print(f"\npipeline stages P x replicas D = {args.workers}, m = {args.microbatches}, activation "
          f"{args.activation_mb:g} MB at a cut per worker batch (traffic per replica and step)")
    print(f"{'P x D':<10} {'bubble':>7} {'activations':>12} {'gradients':>12} {'state/rank':>10} "
          f"{'step':>10} {'vs best':>8}")
    for r in rows:
        print(f"{r['stages']} x {r['replicas']:<6} {r['bubble']:>7.1%} {r['activation_bytes'] / 1e6:>9.1f} MB "
              f"{r['gradient_bytes'] / 1e6:>9.1f} MB {r['state_per_rank']:>10.2f} "
              f"{costmodel.fmt_seconds(r['step_s']):>10} {r['vs_best']:>7.2f}x")
    dp = next(r for r in rows if r["stages"] == 1)
    best = rows[0]
    if best["stages"] == 1:
        print("pipeline stages do not pay here: the bubble and the activation traffic cost more than the "
              "gradient traffic they save")
    else:
        print(f"pipeline stages pay: P = {best['stages']} is {dp['step_s'] / best['step_s']:.2f}x faster than "
              f"data parallelism alone, and holds 1/{best['stages']} of the model state per rank")


if __name__ == "__main__":
    sys.exit(main())
