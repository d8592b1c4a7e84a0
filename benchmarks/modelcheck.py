"""The cost model (:mod:`.costmodel`) calibrated on this run's measurements and checked against
every measured point; the targets of the benchmark suite, each with its measured figure.

Calibration, all from the same ``results.json``:
- each collective path: alpha and bandwidth per size regime (:func:`costmodel.fit_path`) from
  its own sweep;
- compute: one rank's step time from the throughput limit at 2 ranks (independent processes);
- a training step: compute plus the exchange of the whole gradient on the path the strategy
  uses, not overlapped (one core per rank here: the exchange runs on the core that computes).
"""
from __future__ import annotations

import math
from typing import Any, Optional

from . import core, costmodel

TITLE = "Cost model: calibration, error against every measured point, projection"
TOLERANCE = 0.20
# the collective path each training variant exchanges its gradient on
TRAINING_PATHS = {"horovod": "horovod-mpi/trainer", "ddp": "torch-gloo", "hand/ddp": "torch-gloo",
                  "ps/sync": "ps", "hand/horovod": "horovod-mpi/stock"}


def evaluate(results: dict[str, Any]) -> dict[str, Any]:
    secs = results.get("sections", {})
    out: dict[str, Any] = {"links": {}, "paths": {}, "points": []}
    coll = secs.get("collectives")
    if coll and "paths" in coll:
        for name, p in coll["paths"].items():
            pts = [(int(s), q["seconds"]["median"]) for s, q in p["points"].items()]
            model = costmodel.fit_path(pts)
            out["paths"][name] = model.to_dict()
            big = model.regimes[-1][1]
            out["links"][name] = big.to_dict() | {"alpha_s": model.regimes[0][1].alpha_s}
            for e in costmodel.errors(pts, model.predict):
                out["points"].append({"section": "collectives", "kind": "fit", "label": f"{name} {e['bytes']} B", **e})
    thr = secs.get("throughput")
    if thr and "ranks" in thr and "2" in thr["ranks"]:
        batch, two = thr["batch_per_rank"], thr["ranks"]["2"]
        compute = batch / (two["limit"]["median"] / 2)
        out["compute_s"] = compute
        grad_bytes = thr["params"] * 4
        for variant, path in TRAINING_PATHS.items():
            if variant in two and path in out["paths"]:
                model = costmodel.PathModel(tuple((u["upto_bytes"], costmodel.Link(u["alpha_s"], u["bandwidth"]))
                                                  for u in out["paths"][path]["regimes"]))
                measured = 2 * batch / two[variant]["median"]  # seconds per step
                predicted = costmodel.step_s(compute, model.predict(grad_bytes))
                out["points"].append({"section": "throughput", "kind": "prediction", "label": f"{variant} step, 2 ranks",
                                      "bytes": grad_bytes, "measured_s": measured, "predicted_s": predicted,
                                      "error": costmodel.relative_error(predicted, measured)})
    lk = secs.get("links")
    for p in (lk or {}).get("points", []) if isinstance(lk, dict) else []:
        if p.get("measured_s") and p.get("predicted_s"):
            out["points"].append({"section": "links", "kind": "prediction", "label": p.get("label", "?"), "bytes": p.get("bytes"),
                                  "measured_s": p["measured_s"], "predicted_s": p["predicted_s"],
                                  "error": costmodel.relative_error(p["predicted_s"], p["measured_s"])})
    alpha = (lk or {}).get("alpha_s") if isinstance(lk, dict) else None
    out["projection_link"] = costmodel.Link.gbit(25.0, alpha_s=alpha or 10e-6).to_dict()
    out["projection"] = costmodel.project(link=costmodel.Link(**out["projection_link"]))
    errs = [abs(p["error"]) for p in out["points"]]
    out["max_abs_error"] = max(errs) if errs else None
    out["within"] = sum(e <= TOLERANCE for e in errs)
    for kind in ("fit", "prediction"):
        sel = [abs(p["error"]) for p in out["points"] if p["kind"] == kind]
        out[f"max_abs_error_{kind}"] = max(sel) if sel else None
        out[f"within_{kind}"], out[f"count_{kind}"] = sum(e <= TOLERANCE for e in sel), len(sel)
    return out


def _target_rows(results: dict[str, Any], check: dict[str, Any]) -> list[tuple[str, Optional[float], float, str]]:
    secs = results.get("sections", {})
    thr, coll, lk = secs.get("throughput", {}), secs.get("collectives", {}), secs.get("links", {})
    mon, pp, rare = secs.get("monitoring", {}), secs.get("pipeline", {}), secs.get("rare", {})
    fed, tune = secs.get("fedavg", {}), secs.get("tune", {})
    two = thr.get("ranks", {}).get("2", {})
    rows: list[tuple[str, Optional[float], float, str]] = [
        ("default strategy (horovod) at 2 ranks / limit", two.get("horovod", {}).get("vs_limit"), 0.95, ">="),
        ("default strategy / hand-written DDP, 2 ranks",
         two["horovod"]["median"] / two["hand/ddp"]["median"] if "horovod" in two and "hand/ddp" in two else None, 1.0, ">="),
        ("trainer's gradient path busbw at 16 MB / raw MPI_Allreduce",
         coll.get("ratios_16MB", {}).get("horovod-mpi/trainer"), 0.8, ">="),
        ("PS push+pull on capped links / cost-model bound (worst cap)",
         lk.get("ps_vs_bound_min") if isinstance(lk, dict) else None, 0.8, ">="),
        ("cost model, calibration: worst |error| of a path's fit at its own points",
         check.get("max_abs_error_fit"), TOLERANCE, "<="),
        ("cost model, predictions: worst |error| (training steps, testbed links)",
         check.get("max_abs_error_prediction"), TOLERANCE, "<="),
        ("PS sync / naive mpi4py PS, 2 workers + 1 server", thr.get("ps_sync_vs_naive"), 1.0, ">="),
        ("monitoring on / off (TensorBoard + Prometheus textfile), default strategy, 2 ranks",
         mon.get("ratio"), mon.get("target", 0.98), ">="),
        ("pipeline P = 2, m >= 4: worst |measured efficiency / bubble theory - 1|",
         pp.get("efficiency_worst_deviation"), 0.10, "<="),
        ("the same against the whole model running the same m microbatches (bubble and messages only)",
         pp.get("efficiency_same_m_worst_deviation"), 0.10, "<="),
        ("pipeline P = 2 / P = 1: parameter + optimizer bytes per rank", pp.get("memory", {}).get("ratio"), 0.55, "<="),
        ("pipeline m = 8: peak activation bytes 1F1B / GPipe (worst stage)", pp.get("activation_ratio_max"), 1.0, "<="),
        ("100 Mbit: best of local SGD / DiLoCo, time to target / synchronous allreduce's",
         rare.get("best_rare_ratio_capped"), 0.33, "<="),
        ("FedAvg alpha = 0.1, E = 5: best FedProx gain over FedAvg, points (last rounds' accuracy, median of seeds)",
         max((r["tail_pp"]["median"] for r in fed.get("recovery", {}).values()), default=None), 0.0, ">"),
        ("hvd-tune: trials per hour, 2 groups / 1 group, as a share of g = 2 (median of rounds)",
         tune.get("pack", {}).get("share_of_g", {}).get("median"), 0.85, ">="),
        ("hvd-tune: ASHA + TPE best accuracy below the grid's, points (median of sampler seeds)",
         (tune.get("search", {}).get("gap_pp") or {}).get("median"), 0.5, "<="),
        ("hvd-tune: ASHA + TPE training steps / the grid's (median of sampler seeds)",
         tune.get("search", {}).get("steps_ratio", {}).get("median"), 0.4, "<="),
    ]
    return rows


def targets_markdown(results: dict[str, Any], check: dict[str, Any]) -> str:
    lines = ["| target | measured | goal | met |", "|---|---|---|---|"]
    for label, value, goal, op in _target_rows(results, check):
        if value is None:
            lines.append(f"| {label} | not measured | {op} {goal} | |")
            continue
        met = {">=": value >= goal, "<=": value <= goal, ">": value > goal}[op]
        lines.append(f"| {label} | {value:.3f} | {op} {goal} | {'yes' if met else '**no**'} |")
    return "\n".join(lines)


def markdown(check: dict[str, Any], plots) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["Model: ring `2(N-1)·alpha + 2(N-1)/N·S/B`; PS (k servers on their own hosts) "
             "`2·alpha + 2·max(S/B, N·S/(k·B))`; step = compute + the exchange not hidden behind "
             "backward. Each collective path is calibrated on its own sweep (alpha and B per size "
             "regime); training steps are predicted from the limit's compute and the path's model "
             "at the gradient's size, with no overlap (the exchange needs the core that computes).", ""]
    if check["paths"]:
        lines += ["Calibrated paths (alpha, bandwidth per regime):", "",
                  "| path | regimes |", "|---|---|"]
        for name, p in check["paths"].items():
            regs = "; ".join(f"≤ {'∞' if math.isinf(r['upto_bytes']) else int(r['upto_bytes'])} B: alpha "
                             f"{r['alpha_s'] * 1e6:.1f} µs, B {r['bandwidth'] / 1e9:.2f} GB/s" for r in p["regimes"])
            lines.append(f"| {name} | {regs} |")
        lines.append("")
    pts = check["points"]
    if pts:
        n_ok = check["within"]
        lines += [f"Every measured point against the model: {n_ok} of {len(pts)} within ±{TOLERANCE:.0%}; "
                  f"worst |error| {check['max_abs_error']:.1%}. Two kinds of point: *fit* (a collective "
                  f"path's calibration, checked at the sizes it was fitted on: {check['within_fit']} of "
                  f"{check['count_fit']} within) and *prediction* (a training step from the limit's compute and "
                  f"a path's model at the gradient's size, or a testbed step and exchange from the link's measured "
                  f"bandwidth and latency: {check['within_prediction']} of {check['count_prediction']} within).", "",
                  "| section | kind | point | measured | predicted | error |", "|---|---|---|---|---|---|"]
        for p in pts:
            flag = "" if abs(p["error"]) <= TOLERANCE else " **"
            lines.append(f"| {p['section']} | {p['kind']} | {p['label']} | {costmodel.fmt_seconds(p['measured_s'])} | "
                         f"{costmodel.fmt_seconds(p['predicted_s'])} | {p['error']:+.1%}{flag} |")
        fig, ax = plt.subplots(figsize=(5.5, 5))
        for section in sorted({p["section"] for p in pts}):
            sel = [p for p in pts if p["section"] == section]
            ax.scatter([p["measured_s"] for p in sel], [p["predicted_s"] for p in sel], label=section, s=18)
        lo = min(min(p["measured_s"], p["predicted_s"]) for p in pts) / 2
        hi = max(max(p["measured_s"], p["predicted_s"]) for p in pts) * 2
        ax.plot([lo, hi], [lo, hi], color="black", linewidth=1)
        ax.fill_between([lo, hi], [lo * 0.8, hi * 0.8], [lo * 1.2, hi * 1.2], color="gray", alpha=0.2, label="±20%")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("measured (s)")
        ax.set_ylabel("predicted (s)")
        ax.set_title("cost model vs every measured point")
        ax.legend(fontsize=8)
        core.save_plot(fig, plots / "model_vs_measured.png")
        lines += ["", "![model vs measured](plots/model_vs_measured.png)", ""]
    link = check["projection_link"]
    lines += [f"Projection: a ResNet-50-sized gradient ({costmodel.RESNET50_PARAMS / 1e6:.1f}M fp32 parameters) "
              f"at 25 Gbit/s, alpha {link['alpha_s'] * 1e6:.0f} µs, a worker's step {costmodel.GPU_STEP_S * 1e3:.0f} ms "
              f"(assumed: batch 64 at ~200 images/s on a Pascal-class GPU; no GPU here to measure it). "
              f"Horovod publishes {costmodel.HOROVOD_PUBLISHED['efficiency']:.0%} on "
              f"{costmodel.HOROVOD_PUBLISHED['workers']} GPUs at 25 Gbit/s.", "",
              "| workers | ring exchange | ring eff. (no overlap) | ring eff. (overlap with backward) | PS k=N eff. (no overlap) | PS k=N/8 eff. (no overlap) |",
              "|---|---|---|---|---|---|"]
    for r in check["projection"]:
        lines.append(f"| {r['workers']} | {costmodel.fmt_seconds(r['ring_s'])} | {r['ring_eff']:.1%} | "
                     f"{r['ring_eff_overlap']:.1%} | {r['ps_k=N_eff']:.1%} | {r['ps_k=N/8_eff']:.1%} |")
    fig, ax = plt.subplots(figsize=(6, 4))
    ws = [r["workers"] for r in check["projection"]]
    for key, label in (("ring_eff", "ring, no overlap"), ("ring_eff_overlap", "ring, overlap with backward"),
                       ("ps_k=N_eff", "PS, k = N servers"), ("ps_k=N/8_eff", "PS, k = N/8 servers")):
        ax.plot(ws, [r[key] for r in check["projection"]], marker="o", label=label)
    ax.scatter([costmodel.HOROVOD_PUBLISHED["workers"]], [costmodel.HOROVOD_PUBLISHED["efficiency"]], color="red",
               marker="*", s=120, zorder=5, label="Horovod published (512 GPUs)")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("workers")
    ax.set_ylabel("scaling efficiency")
    ax.set_title("ResNet-50 gradient at 25 Gbit/s: projected")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    core.save_plot(fig, plots / "projection.png")
    lines += ["", "![projection](plots/projection.png)", "",
              "`hvd-bench --advise --params P --workers N [--link-gbit G] [--compute-ms C]` prints the same "
              "model's ranking of strategies and knobs for a given model, worker count and link."]
    return "\n".join(lines)
