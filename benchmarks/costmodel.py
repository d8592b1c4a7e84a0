"""An alpha-beta cost model of gradient exchange: ring-allreduce and a k-server parameter server.

A message of ``S`` bytes over a link costs ``alpha + S / B`` (alpha: the per-message latency,
B: the bandwidth in bytes/s). Then, for ``N`` workers:

- ring-allreduce (reduce-scatter, then allgather; every link busy at once):
  ``2 (N-1) alpha + 2 (N-1)/N * S / B``
- a parameter server with ``k`` servers on their own hosts (not colocated with workers), push
  then pull: each worker moves ``S`` each way, each server ``N S / k`` each way, so the busier
  side decides: ``2 alpha + 2 max(S / B, N S / (k B))``

A step is compute plus the part of the exchange not hidden behind it (``overlap``: the fraction
of the exchange that runs during backward; 0 where the exchange needs the same core as compute,
as on this 2-core machine with one rank per core).

Pipeline stages (``P`` stages x ``D = N / P`` replicas, ``m`` microbatches) trade gradient
traffic for activation traffic and a bubble. At the same global batch a replica's batch is P
times a data-parallel worker's, so with ``c`` one worker's compute under data parallelism and
``a`` the activation bytes at one cut for one microbatch:

- step: ``(m + P - 1) (c / m + 2 (alpha + a / B))`` (every stage's share of a microbatch, its
  activation out and its gradient back, stretched by the bubble ``(P - 1) / (m + P - 1)``),
  plus a ring over the D replicas of a stage's ``S / P`` bytes of gradient;
- traffic per replica and step: activations ``2 (P - 1) m a`` against gradients
  ``2 (D - 1) / D * S``.

Local SGD (``strategy: local_sgd``, H steps alone between averagings) moves the ring's
``2 (N-1)/N * S`` once every H steps, after a step (no overlap with backward): a step costs
``c + ring / H`` on average, against ``c + ring`` for synchronous allreduce, so the speedup is
``(c + ring) / (c + ring / H)``, at most H. This is time per step only: it says nothing about
the accuracy H local steps reach (``hvd-bench --only rare`` measures time to a target).

The model is calibrated where it runs (:func:`fit`: alpha and B of each exchange path from its
measured times at several sizes) and checked against every measured point (:func:`errors`).
``hvd-bench --advise`` (:func:`advise`) uses it to rank strategies for a user's model, worker
count and link.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Optional, Sequence

GBIT = 1e9 / 8  # bytes/s in one Gbit/s


@dataclass(frozen=True)
class Link:
    """``alpha_s``: seconds per message; ``bandwidth``: bytes/s."""

    alpha_s: float
    bandwidth: float

    @classmethod
    def gbit(cls, gbit_s: float, alpha_s: float = 0.0) -> "Link":
        return cls(alpha_s, gbit_s * GBIT)

    def message_s(self, nbytes: float) -> float:
        return self.alpha_s + nbytes / self.bandwidth

    def to_dict(self) -> dict:
        return asdict(self)


def ring_allreduce_s(nbytes: float, n: int, link: Link) -> float:
    """Seconds for a ring-allreduce of ``nbytes`` over ``n`` ranks (0 for one rank)."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) * link.alpha_s + 2 * (n - 1) / n * nbytes / link.bandwidth


def ps_push_pull_s(nbytes: float, workers: int, servers: int, link: Link) -> float:
    """Seconds for every worker to push ``nbytes`` of gradient and pull ``nbytes`` of
    parameters, spread over ``servers`` non-colocated server hosts."""
    if workers < 1 or servers < 1:
        raise ValueError("workers and servers must be >= 1")
    return 2 * link.alpha_s + 2 * max(nbytes / link.bandwidth, workers * nbytes / (servers * link.bandwidth))


def step_s(compute_s: float, comm_s: float, overlap: float = 0.0) -> float:
    """A training step: compute, plus the exchange not hidden behind it."""
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap must be in [0, 1], got {overlap}")
    return compute_s + max(comm_s * (1 - overlap), comm_s - overlap * compute_s)


def efficiency(compute_s: float, comm_s: float, overlap: float = 0.0) -> float:
    """Scaling efficiency: the step without communication over the step with it."""
    return compute_s / step_s(compute_s, comm_s, overlap)


# --- calibration ------------------------------------------------------------------------------------
def fit(points: Iterable[tuple[float, float]], bus_factor: float = 1.0) -> Link:
    """alpha and B from measured ``(nbytes, seconds)`` points of one exchange path, for the
    model ``t = alpha + bus_factor * nbytes / B`` (``bus_factor``: 2(N-1)/N for a ring).

    Least squares on the *relative* error (weights 1/t^2): a 64 MB point must not drown the
    4 KB ones, since the model is checked against every point as a ratio."""
    pts = [(float(s), float(t)) for s, t in points if t > 0]
    if len(pts) < 2:
        raise ValueError("need at least two measured points to fit alpha and bandwidth")
    # minimise sum ((a + b x - t) / t)^2 with x = bus_factor * s: 2x2 normal equations
    w = [1.0 / (t * t) for _, t in pts]
    xs = [bus_factor * s for s, _ in pts]
    ts = [t for _, t in pts]
    sw = sum(w)
    swx = sum(wi * x for wi, x in zip(w, xs))
    swxx = sum(wi * x * x for wi, x in zip(w, xs))
    swt = sum(wi * t for wi, t in zip(w, ts))
    swxt = sum(wi * x * t for wi, x, t in zip(w, xs, ts))
    det = sw * swxx - swx * swx
    if det <= 0:
        raise ValueError("the points do not determine a line (one size only?)")
    a = (swt * swxx - swx * swxt) / det
    b = (sw * swxt - swx * swt) / det
    if b <= 0:  # flat or falling with size: latency-bound throughout; keep a finite bandwidth
        b = min(t / x for x, t in zip(xs, ts) if x > 0)
        a = max(0.0, min(t - b * x for x, t in zip(xs, ts)))
    return Link(max(0.0, a), 1.0 / b)


@dataclass(frozen=True)
class PathModel:
    """One exchange path as measured here: an alpha-beta line per size regime. A message
    changes regime with size: latency-bound (Open MPI's eager protocol), then bandwidth-bound
    in cache, then bandwidth-bound in DRAM (a 64 MB float32 allreduce no longer fits any
    cache). ``regimes`` holds ``(largest size, Link)`` pairs, smallest first."""

    regimes: tuple[tuple[float, Link], ...]
    bus_factor: float = 1.0

    def predict(self, nbytes: float) -> float:
        for upto, link in self.regimes:
            if nbytes <= upto:
                break
        return link.alpha_s + self.bus_factor * nbytes / link.bandwidth

    def to_dict(self) -> dict:
        return {"bus_factor": self.bus_factor,
                "regimes": [{"upto_bytes": u, **l.to_dict()} for u, l in self.regimes]}


def fit_path(points: Sequence[tuple[float, float]], bus_factor: float = 1.0, max_regimes: int = 3,
             min_points: int = 2) -> PathModel:
    """The model of at most ``max_regimes`` contiguous size regimes (at least ``min_points``
    points each, each fitted by :func:`fit`) with the smallest worst relative error over
    ``points``; fewer regimes win ties."""
    pts = sorted((float(s), float(t)) for s, t in points)

    def worst(model: PathModel) -> float:
        return max(abs(relative_error(model.predict(s), t)) for s, t in pts)

    def build(cuts: tuple[int, ...]) -> Optional[PathModel]:
        bounds = (0, *cuts, len(pts))
        try:
            regs = tuple((pts[b - 1][0] if b < len(pts) else math.inf, fit(pts[a:b], bus_factor))
                         for a, b in zip(bounds, bounds[1:]))
        except ValueError:
            return None
        return PathModel(regs, bus_factor)

    best = build(())
    assert best is not None
    n = len(pts)
    cands = [(i,) for i in range(min_points, n - min_points + 1)]
    if max_regimes >= 3:
        cands += [(i, j) for i in range(min_points, n + 1) for j in range(i + min_points, n - min_points + 1)]
    for cuts in cands:
        cand = build(cuts)
        if cand is not None and worst(cand) < worst(best) - 1e-9:
            best = cand
    return best


def relative_error(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured


def errors(points: Sequence[tuple[float, float]], predict) -> list[dict]:
    """Every measured ``(nbytes, seconds)`` point beside ``predict(nbytes)`` and its error."""
    out = []
    for nbytes, measured in points:
        pred = predict(nbytes)
        out.append({"bytes": nbytes, "measured_s": measured, "predicted_s": pred,
                    "error": relative_error(pred, measured)})
    return out


# --- projection and advice ---------------------------------------------------------------------------
# Horovod's published result: 90% scaling efficiency for Inception V3 and ResNet-101 on 512 GPUs
# (128 servers x 4 Pascal GPUs, 25 Gbit/s RoCE); github.com/horovod/horovod README.
HOROVOD_PUBLISHED = {"workers": 512, "efficiency": 0.90, "link_gbit": 25.0}
RESNET50_PARAMS = 25.6e6
# What the projection assumes for one worker's compute (no GPU here to measure it): ResNet-50,
# batch 64, fp32 on a Pascal-class GPU at ~200 images/s; backward ~2/3 of it, so that much of
# the ring can overlap with it (Horovod starts allreduces during backward).
GPU_STEP_S = 64 / 200.0
BACKWARD_FRACTION = 2 / 3


def project(params: float = RESNET50_PARAMS, link: Optional[Link] = None, compute_s: float = GPU_STEP_S,
            workers: Sequence[int] = (2, 8, 32, 128, 512), bytes_per_param: int = 4,
            overlap: float = BACKWARD_FRACTION) -> list[dict]:
    """Scaling efficiency of a ring (without and with overlap of the exchange and backward) and
    of a PS pushing after backward (k = N servers, i.e. one per worker host; and k = N/8)
    against worker count."""
    link = link or Link.gbit(25.0, alpha_s=10e-6)
    nbytes = params * bytes_per_param
    rows = []
    for n in workers:
        ring = ring_allreduce_s(nbytes, n, link)
        ps_n = ps_push_pull_s(nbytes, n, n, link)
        ps_8 = ps_push_pull_s(nbytes, n, max(1, n // 8), link)
        rows.append({"workers": n, "ring_s": ring, "ps_k=N_s": ps_n, "ps_k=N/8_s": ps_8,
                     "ring_eff": efficiency(compute_s, ring), "ring_eff_overlap": efficiency(compute_s, ring, overlap),
                     # the trainer's PS pushes after backward: no overlap (as in advise())
                     "ps_k=N_eff": efficiency(compute_s, ps_n), "ps_k=N/8_eff": efficiency(compute_s, ps_8)})
    return rows


def advise(params: float, workers: int, link: Link, compute_s: float, overlap: float = BACKWARD_FRACTION,
           server_counts: Optional[Sequence[int]] = None) -> list[dict]:
    """Candidate exchange designs for a model of ``params`` fp32 parameters on ``workers``
    workers over ``link``, fastest first: predicted step time, efficiency, and how much slower
    than the best each is."""
    nbytes = params * 4
    cands: list[tuple[str, str, float]] = [
        ("horovod", "ring-allreduce, fp32 (default)", ring_allreduce_s(nbytes, workers, link)),
        ("horovod", "ring-allreduce, horovod.compression=fp16", ring_allreduce_s(nbytes / 2, workers, link)),
    ]
    for k in server_counts or sorted({1, max(1, workers // 4), workers}):
        cands.append(("ps", f"ps.num_servers={k} (own hosts), ps.mode=sync",
                      ps_push_pull_s(nbytes, workers, k, link)))
    rows = []
    for strategy, knobs, comm in cands:
        st = step_s(compute_s, comm, overlap if strategy == "horovod" else 0.0)
        rows.append({"strategy": strategy, "knobs": knobs, "comm_s": comm, "step_s": st,
                     "efficiency": compute_s / st})
    rows.sort(key=lambda r: r["step_s"])
    for r in rows:
        r["vs_best"] = r["step_s"] / rows[0]["step_s"]
    return rows


def local_sgd_step_s(compute_s: float, nbytes: float, workers: int, link: Link, sync_every: int) -> float:
    """A local-SGD step on average: compute, plus one ring-allreduce of the parameters every
    ``sync_every`` steps (after the step: not overlapped)."""
    if sync_every < 1:
        raise ValueError(f"sync_every must be >= 1, got {sync_every}")
    return compute_s + ring_allreduce_s(nbytes, workers, link) / sync_every


def advise_local_sgd(params: float, workers: int, link: Link, compute_s: float, sync_every: Sequence[int],
                     overlap: float = BACKWARD_FRACTION) -> list[dict]:
    """Local SGD at each H of ``sync_every`` against synchronous ring-allreduce (fp32, its exchange
    overlapped with backward by ``overlap`` as in :func:`advise`): the average step and the
    speedup per step. Time only: H local steps may need more steps to the same accuracy."""
    nbytes = params * 4
    sync = step_s(compute_s, ring_allreduce_s(nbytes, workers, link), overlap)
    rows = []
    for h in sync_every:
        st = local_sgd_step_s(compute_s, nbytes, workers, link, h)
        rows.append({"sync_every": h, "comm_s": ring_allreduce_s(nbytes, workers, link) / h, "step_s": st,
                     "speedup": sync / st, "bytes_per_step": gradient_traffic_bytes(nbytes, workers) / h})
    return rows


# --- pipeline stages ------------------------------------------------------------------------------------
def pipeline_bubble(stages: int, microbatches: int) -> float:
    """The idle fraction of a GPipe or 1F1B step: ``(P - 1) / (m + P - 1)``."""
    if stages < 1 or microbatches < 1:
        raise ValueError("stages and microbatches must be >= 1")
    return (stages - 1) / (microbatches + stages - 1)


def activation_traffic_bytes(stages: int, microbatches: int, activation_bytes: float) -> float:
    """Bytes one replica's pipeline moves per step: every microbatch's activation forward and
    its gradient back across each of the ``P - 1`` cuts."""
    return 2 * (stages - 1) * microbatches * activation_bytes


def gradient_traffic_bytes(param_bytes: float, replicas: int) -> float:
    """Bytes a replica's ranks send per step in the ring over ``D`` replicas (each stage's share
    of the ``S`` bytes of gradient, summed over the stages): ``2 (D - 1) / D * S``."""
    return 2 * (replicas - 1) / replicas * param_bytes if replicas > 1 else 0.0


def pipeline_step_s(compute_s: float, stages: int, microbatches: int, activation_bytes: float,
                    param_bytes: float, replicas: int, link: Link, overlap: float = 0.0) -> float:
    """A step of ``stages`` x ``replicas`` at the global batch that ``stages * replicas``
    data-parallel workers of ``compute_s`` each would run (see the module docstring).
    ``activation_bytes``: one microbatch's at one cut. ``stages = 1`` is data parallelism."""
    p, m = stages, microbatches
    per_micro = compute_s / m + (2 * link.message_s(activation_bytes) if p > 1 else 0.0)
    compute = (m + p - 1) * per_micro
    return step_s(compute, ring_allreduce_s(param_bytes / p, replicas, link), overlap)


def advise_pipeline(params: float, workers: int, link: Link, compute_s: float, activation_bytes: float,
                    microbatches: int = 8, overlap: float = BACKWARD_FRACTION,
                    max_stages: int = 64) -> list[dict]:
    """Every pipeline depth P dividing ``workers`` (P = 1: data parallelism) at the same global
    batch, fastest first. ``activation_bytes``: the activation at one cut for one data-parallel
    worker's batch (e.g. batch x seq_len x width x 4); a replica's batch is P times that, split
    into ``microbatches``."""
    nbytes = params * 4
    rows = []
    for p in (p for p in range(1, min(workers, max_stages) + 1) if workers % p == 0):
        d, m = workers // p, (microbatches if p > 1 else 1)
        a = activation_bytes * p / m
        st = pipeline_step_s(compute_s, p, m, a, nbytes, d, link, overlap)
        rows.append({"stages": p, "replicas": d, "microbatches": m, "bubble": pipeline_bubble(p, m),
                     "activation_bytes": activation_traffic_bytes(p, m, a),
                     "gradient_bytes": gradient_traffic_bytes(nbytes, d), "state_per_rank": 1 / p,
                     "step_s": st, "efficiency": compute_s / st})
    rows.sort(key=lambda r: r["step_s"])
    for r in rows:
        r["vs_best"] = r["step_s"] / rows[0]["step_s"]
    return rows


def fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return str(s)
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"
