"""Pipeline parallelism on the transformer: efficiency against the schedule's bubble, memory per
rank, and convergence at P = 1, P = 2 and D x P = 2 x 2.

Not the data pipeline (that is ``pipeline.py``). Three kinds of job:

``steps``  (2 ranks, one core each) the trainer's own :class:`PipelineExecutor` and stage cut on
           a fixed batch. In every round rank 0 times the whole model on its own (one rank, one
           thread: the baseline ``T1``) while rank 1 waits, and both time a pipelined step for
           every schedule and m, the order flipping each round. Efficiency = T1 / (P x Tp), against
           the bubble's m / (m + P - 1). A step here is forward and backward (the optimizer's
           update is the same work in both and no part of the schedule). The same job counts
           parameter + AdamW state bytes per stage after one update, and the peak bytes autograd
           holds for backward on each stage at m = 8 (:class:`SavedBytes`).
``train``  ``hvd-train transformer`` with this section's overrides; rank 0 returns the summary.

Run: ``hvd-bench --only pipeline`` (about 5 minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import weakref
from pathlib import Path
from typing import Any, Optional

from . import core
from .core import Bench

TITLE = "Pipeline parallelism: efficiency against the bubble, memory per rank, convergence"
STAGES = 2
MICROBATCHES = (1, 2, 4, 8)
SCHEDULES = ("gpipe", "1f1b")
TOLERANCE = 0.10          # the target: within 10% of the theory once m >= 4
MEMORY_TARGET = 0.55      # parameter + optimizer bytes per rank at P = 2 over P = 1
# the timed model: big enough that compute dominates the activation messages
MODEL = {"width": 256, "heads": 4, "layers": 4, "seq_len": 128, "batch": 32, "vocab": 256}
# convergence: the built-in `transformer` config, less text and fewer epochs to fit a few minutes
TRAIN = ["data.text_bytes=300000", "epochs=2"]
LAYOUTS = (("P=1", 1, 1), ("P=2", 2, 2), ("DxP=2x2", 4, 2))  # (name, ranks, stages)


def count(mode: core.Mode) -> int:
    return 1 + len(LAYOUTS)


def repeats(mode: core.Mode) -> int:
    """Rounds of the steps job: more than the mode's repeats, as the monitoring section's, since
    the machine is shared and one round times each variant once."""
    return 2 * mode.repeats + 1


# --- pure parts ------------------------------------------------------------------------------------
def bubble(stages: int, microbatches: int) -> float:
    """The schedule's ideal efficiency, m / (m + P - 1)."""
    return microbatches / (microbatches + stages - 1)


def efficiency(whole_s: float, stage_s: float, stages: int) -> float:
    """The whole model's step on one rank over the pipeline's P ranks' step time."""
    return whole_s / (stages * stage_s)


def efficiency_rows(whole: list[float], piped: dict[str, dict[int, list[float]]], stages: int,
                    whole_m: Optional[dict[int, list[float]]] = None) -> list[dict]:
    """One row per (schedule, m): the measured efficiency (each pipelined repeat against the
    baseline's median: median and spread), the theory and measured / theory.
    ``piped[schedule][m]``: seconds per pipelined step, every repeat. ``whole_m[m]``: the whole
    model on one rank running the same m microbatches one after the other; efficiency against
    it leaves out what splitting the batch alone gains or costs, and keeps the bubble and the
    messages."""
    t1 = statistics.median(whole)
    rows = []
    for schedule, by_m in piped.items():
        for m, times in sorted(by_m.items()):
            eff = core.summary([efficiency(t1, t, stages) for t in times])
            theory = bubble(stages, m)
            row = {"schedule": schedule, "m": m, "step_s": core.summary(times), "efficiency": eff,
                   "theory": theory, "ratio": eff["median"] / theory,
                   "ratio_min": eff["min"] / theory, "ratio_max": eff["max"] / theory,
                   "within": m < 4 or abs(eff["median"] / theory - 1) <= TOLERANCE}
            if whole_m and m in whole_m:
                same = core.summary([efficiency(statistics.median(whole_m[m]), t, stages) for t in times])
                row["efficiency_same_m"] = same
                row["ratio_same_m"] = same["median"] / theory
            rows.append(row)
    return rows


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(model, optimizer) -> dict[str, int]:
    """Bytes of a model's parameters and of its optimizer's state tensors (after a step)."""
    import torch

    opt = tensor_bytes(v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    params = tensor_bytes(model.parameters())
    return {"params": params, "optimizer": opt, "total": params + opt}


class SavedBytes:
    """Bytes of the tensors autograd keeps for backward, alive now and at most: a
    ``saved_tensors_hooks`` pack hook holds each saved tensor in a ``_Held`` whose finaliser
    subtracts it. A storage saved twice (or a view of it) counts once; parameters (saved by
    matmuls) are not activations and are left out."""

    def __init__(self, exclude=()) -> None:
        self.live = self.peak = 0
        self._refs: dict[int, list[int]] = {}   # storage address -> [holders, bytes]
        self._exclude = {p.untyped_storage().data_ptr() for p in exclude}

    def hooks(self):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self._pack, _Held.unpack)

    def _pack(self, t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self._exclude or storage.nbytes() == 0:
            return t
        ref = self._refs.setdefault(key, [0, storage.nbytes()])
        if ref[0] == 0:
            self.live += ref[1]
            self.peak = max(self.peak, self.live)
        ref[0] += 1
        held = _Held(t)
        weakref.finalize(held, self._release, key)
        return held

    def _release(self, key: int) -> None:
        ref = self._refs[key]
        ref[0] -= 1
        if ref[0] == 0:
            self.live -= ref[1]
            del self._refs[key]


class _Held:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor) -> None:
        self.tensor = tensor

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held


def memory_ratio(whole: dict[str, int], stages: list[dict[str, int]]) -> float:
    """The largest stage's parameter + optimizer bytes over the whole model's."""
    return max(s["total"] for s in stages) / whole["total"]


def perplexity_rows(summaries: dict[str, dict]) -> list[dict]:
    """Held-out perplexity per layout against the unigram baseline of the same text."""
    rows = []
    for name, s in summaries.items():
        ppl, uni = s["final_test_perplexity"], s["unigram_perplexity"]
        rows.append({"layout": name, "perplexity": ppl, "unigram": uni, "ratio": ppl / uni,
                     "wall_s": s.get("wall_seconds"), "ranks": s.get("ranks"), "global_batch": s.get("global_batch")})
    return rows


# --- the section ----------------------------------------------------------------------------------
def run(bench: Bench) -> dict:
    mode = bench.mode
    steps = bench.job("pipeline_parallel", ["steps", "--repeats", str(repeats(mode)), "--warmup", str(mode.warmup)],
                      STAGES, desc="pipeline steps", timeout=1800)
    summaries = {}
    for name, np, stages in LAYOUTS:
        run_dir = bench.scratch()
        # np 4 on 2 cores: mpirun_command oversubscribes (and yields when idle) by itself
        summaries[name] = bench.job("pipeline_parallel", ["train", "--run-dir", run_dir, "--stages", str(stages)],
                                    np, desc=f"pipeline train {name}", timeout=1800)
    return summarize(steps, summaries)


def summarize(steps: dict, summaries: dict[str, dict]) -> dict[str, Any]:
    piped = {s: {int(m): t for m, t in by_m.items()} for s, by_m in steps["piped"].items()}
    whole_m = {int(m): t for m, t in steps.get("whole_m", {}).items()}
    whole_m.setdefault(1, steps["whole"])
    rows = efficiency_rows(steps["whole"], piped, STAGES, whole_m)
    mem = steps["memory"]
    act = steps["activations"]
    high = [abs(r["ratio"] - 1) for r in rows if r["m"] >= 4]
    high_same_m = [abs(r["ratio_same_m"] - 1) for r in rows if r["m"] >= 4 and "ratio_same_m" in r]
    act_ratio = [o / g for o, g in zip(act["1f1b"], act["gpipe"])]
    return {"model": MODEL, "stages": STAGES, "train_overrides": TRAIN, "whole_step_s": core.summary(steps["whole"]),
            "efficiency": rows, "target_met": all(r["within"] for r in rows),
            "efficiency_worst_deviation": max(high) if high else None,
            "efficiency_same_m_worst_deviation": max(high_same_m) if high_same_m else None,
            "activation_ratio_max": max(act_ratio),
            "memory": {**mem, "ratio": memory_ratio(mem["whole"], mem["stages"]), "target": MEMORY_TARGET},
            "activations": {**act, "ratio": act_ratio},
            "convergence": perplexity_rows(summaries)}


def markdown(result: dict, plots) -> str:
    mdl = result["model"]
    w = result["whole_step_s"]
    lines = [f"The transformer (width {mdl['width']}, {mdl['layers']} layers, {mdl['heads']} heads, seq_len "
             f"{mdl['seq_len']}, batch {mdl['batch']}, byte vocabulary), cut into P = {result['stages']} stages "
             "balanced by parameters, run by the trainer's `PipelineExecutor` (mpi4py point-to-point) on 2 ranks, "
             "one core and one thread each. A step is forward and backward. Efficiency = (the whole model's step "
             f"on one rank, {1e3 * w['median']:.0f} ms [{1e3 * w['min']:.0f}..{1e3 * w['max']:.0f}]) / "
             "(P x the pipelined step); theory m / (m + P - 1). Median [min..max] over repeats.", "",
             "Last column: the same against the whole model running the same m microbatches one after the other on "
             "one rank (what is left is the bubble and the messages; the difference from the headline is what "
             "splitting the batch alone gains or costs on this CPU).", "",
             "| schedule | m | pipelined step ms | efficiency | theory | measured / theory | same-m baseline: measured / theory |",
             "|---|---|---|---|---|---|---|"]
    for r in result["efficiency"]:
        s, e = r["step_s"], r["efficiency"]
        ratio = f"{r['ratio']:.2f} [{r['ratio_min']:.2f}..{r['ratio_max']:.2f}]"
        lines.append(f"| {r['schedule']} | {r['m']} | {1e3 * s['median']:.0f} [{1e3 * s['min']:.0f}..{1e3 * s['max']:.0f}] | "
                     f"{e['median']:.3f} [{e['min']:.3f}..{e['max']:.3f}] | {r['theory']:.3f} | "
                     + (f"**{ratio}**" if r["m"] >= 4 else ratio)
                     + (f" | {r['ratio_same_m']:.2f}" if "ratio_same_m" in r else " | ") + " |")
    mem, act = result["memory"], result["activations"]
    mib = 2 ** 20
    lines += ["", "Memory per rank. Parameters + AdamW state after one update:", "",
              "| | parameters MiB | optimizer MiB | total MiB |", "|---|---|---|---|",
              "| P = 1 (whole model) | " + " | ".join(f"{mem['whole'][k] / mib:.2f}" for k in ("params", "optimizer", "total")) + " |"]
    for i, s in enumerate(mem["stages"]):
        lines.append(f"| P = 2, stage {i} | " + " | ".join(f"{s[k] / mib:.2f}" for k in ("params", "optimizer", "total")) + " |")
    lines += ["", f"Peak bytes autograd keeps for backward (saved tensors, parameters left out) at m = "
              f"{act['m']}, per stage:", "", "| stage | GPipe MiB | 1F1B MiB | 1F1B / GPipe |", "|---|---|---|---|"]
    for i, (g, o) in enumerate(zip(act["gpipe"], act["1f1b"])):
        lines.append(f"| {i} | {g / mib:.1f} | {o / mib:.1f} | {o / g:.3f} |")
    lines += ["", "Convergence: `hvd-train transformer " + " ".join(result["train_overrides"]) + "` (the same "
              "hyperparameters at every layout, so D x P = 2 x 2, two replicas of batch 32, takes half the optimizer "
              "steps of a global batch twice as large; it runs 4 ranks on 2 cores, oversubscribed):", "",
              "| layout | ranks | global batch | held-out perplexity | unigram baseline | perplexity / unigram | wall s |",
              "|---|---|---|---|---|---|---|"]
    for r in result["convergence"]:
        wall = f"{r['wall_s']:.0f}" if r.get("wall_s") is not None else "?"
        lines.append(f"| {r['layout']} | {r.get('ranks') or '?'} | {r.get('global_batch') or '?'} | {r['perplexity']:.3f} | "
                     f"{r['unigram']:.3f} | {r['ratio']:.3f} | {wall} |")
    high = [r for r in result["efficiency"] if r["m"] >= 4]
    worst = min(high, key=lambda r: r["ratio"]) if high else None
    lines += [""]
    if worst:
        far = max(high, key=lambda r: abs(r["ratio"] - 1))
        lines.append(f"- Efficiency / theory at m >= 4: {min(r['ratio'] for r in high):.2f} to {max(r['ratio'] for r in high):.2f} "
                     f"(furthest: {far['schedule']}, m = {far['m']}); target within {TOLERANCE:.0%}: "
                     f"{'met' if result['target_met'] else '**not met**'}.")
        same = result.get("efficiency_same_m_worst_deviation")
        if same is not None:
            lines.append(f"- Against the same-m baseline (the bubble and the messages only): "
                         f"{min(r['ratio_same_m'] for r in high):.2f} to {max(r['ratio_same_m'] for r in high):.2f}; "
                         f"within {TOLERANCE:.0%}: {'met' if same <= TOLERANCE else '**not met**'}.")
    lines.append(f"- Parameter + optimizer bytes per rank, P = 2 / P = 1: **{mem['ratio']:.3f}** (target <= "
                 f"{mem['target']}: {'met' if mem['ratio'] <= mem['target'] else '**not met**'}).")
    below = all(o < g for o, g in zip(act["1f1b"], act["gpipe"]))
    lines.append(f"- Peak activation bytes, 1F1B / GPipe at m = {act['m']}: "
                 + ", ".join(f"stage {i} **{r:.3f}**" for i, r in enumerate(result["activations"]["ratio"]))
                 + f" (1F1B below GPipe: {'met' if below else '**not met**'}).")
    return "\n".join(lines)


# --- the jobs -------------------------------------------------------------------------------------
def _model():
    import torch

    from hvd_trainer.models import Transformer

    torch.manual_seed(0)
    return Transformer(MODEL["vocab"], MODEL["seq_len"], MODEL["width"], MODEL["layers"], MODEL["heads"])


def _batch():
    import torch

    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, MODEL["vocab"], (MODEL["batch"], MODEL["seq_len"]), generator=g)
    return x, torch.roll(x, -1, dims=1)


def job_steps(args) -> None:
    import torch
    from mpi4py import MPI

    from hvd_trainer.parallel.executor import PipelineExecutor
    from hvd_trainer.parallel.layout import Layout

    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    loss_fn = torch.nn.functional.cross_entropy
    batch = [_batch()]
    out: dict[str, Any] = {}

    executors = {s: PipelineExecutor(Layout(comm.size, STAGES), comm.rank, s, 1) for s in SCHEDULES}
    stage = executors["gpipe"].stage_of(_model())
    whole = _model() if comm.rank == 0 else None

    def whole_step(m: int) -> None:
        """The baseline: the whole model on rank 0 alone, the batch in m pieces one after the
        other (rank 1 waits at the next barrier, on its own core)."""
        whole.zero_grad(set_to_none=True)
        x, y = batch[0]
        for xi, yi in zip(x.tensor_split(m), y.tensor_split(m)):
            (loss_fn(whole(xi), yi) * (len(yi) / len(y))).backward()

    def piped_step(ex) -> None:
        stage.zero_grad(set_to_none=True)
        ex.forward_backward(stage, batch, loss_fn)

    # every round times each variant once, baseline included, the order flipping each round, so
    # drift on a shared machine falls on both sides of a ratio; the first round warms up each
    whole_t: dict[int, list[float]] = {m: [] for m in MICROBATCHES}
    piped: dict[str, dict[int, list[float]]] = {s: {m: [] for m in MICROBATCHES} for s in SCHEDULES}
    order = [("whole", m) for m in MICROBATCHES] + [(s, m) for s in SCHEDULES for m in MICROBATCHES]
    for r in range(args.repeats):
        for kind, m in (order if r % 2 == 0 else order[::-1]):
            warmup = args.warmup if r == 0 else 0
            if kind == "whole":
                if comm.rank == 0:
                    whole_t[m] += core.timed(lambda: whole_step(m), warmup, 1)
                comm.Barrier()
                continue
            ex = executors[kind]
            ex.microbatches = m
            piped[kind][m] += core.timed(lambda: piped_step(ex), warmup, 1, barrier=comm.Barrier)
    if comm.rank == 0:
        out["whole"] = whole_t[1]
        out["whole_m"] = {m: whole_t[m] for m in MICROBATCHES[1:]}
        opt = torch.optim.AdamW(whole.parameters())
        whole_step(1)
        opt.step()
        whole_bytes = state_bytes(whole, opt)
        del whole, opt
    opt = torch.optim.AdamW(stage.parameters())
    opt.step()
    stage_bytes = comm.gather(state_bytes(stage, opt), root=0)

    m = MICROBATCHES[-1]
    peaks = {}
    for s in SCHEDULES:
        ex = executors[s]
        ex.microbatches = m
        counter = SavedBytes(exclude=list(stage.parameters()))
        stage.zero_grad(set_to_none=True)
        comm.Barrier()
        with counter.hooks():
            ex.forward_backward(stage, batch, loss_fn)
        if counter.live:
            raise RuntimeError(f"{s}: {counter.live} saved bytes still alive after the step")
        peaks[s] = comm.gather(counter.peak, root=0)
    for ex in executors.values():
        ex.close()
    if comm.rank == 0:
        out["piped"] = piped
        out["memory"] = {"whole": whole_bytes, "stages": stage_bytes}
        out["activations"] = {"m": m, **peaks}
        core.emit(out)


def job_train(args) -> None:
    from mpi4py import MPI

    from hvd_trainer.cli import main

    overrides = [*TRAIN, f"run_dir={args.run_dir}", f"parallel.pipeline_stages={args.stages}"]
    if args.stages > 1:
        overrides.append("parallel.microbatches=4")
    rc = main(["transformer", *overrides])
    if rc:
        sys.exit(rc)
    if MPI.COMM_WORLD.rank == 0:
        summary = json.loads((Path(args.run_dir) / "summary.json").read_text())
        data = summary.get("data", {})
        core.emit({"final_test_perplexity": summary["final_test_perplexity"],
                   "unigram_perplexity": data["unigram_perplexity"], "wall_seconds": summary.get("wall_seconds"),
                   "global_batch": summary.get("global_batch_size"),
                   "stages": args.stages, "ranks": MPI.COMM_WORLD.size})


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--job", action="store_true", required=True)
    sub = p.add_subparsers(dest="kind", required=True)
    s = sub.add_parser("steps")
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument("--warmup", type=int, default=2)
    t = sub.add_parser("train")
    t.add_argument("--run-dir", required=True)
    t.add_argument("--stages", type=int, default=1)
    args = p.parse_args(argv)
    {"steps": job_steps, "train": job_train}[args.kind](args)


if __name__ == "__main__":
    main()
