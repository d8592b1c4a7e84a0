"""What every ``hvd-bench`` section shares: the run mode, the measured jobs, statistics.

A section is a module with ``TITLE``, ``count(mode)`` (how many jobs it will start: the progress
bar's share), ``run(bench) -> dict`` (JSON-able figures) and ``markdown(result, plots) -> str``
(its part of the report; it draws its PNGs into ``plots``). Its jobs are modules of this package
started as ``python -m benchmarks.<module> --job ...`` under a launcher; rank 0 prints one line
``BENCH_RESULT <json>`` that :meth:`Bench.job` returns. The standalone ``pipeline.py`` runs its
jobs the same way.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

MARK = "BENCH_RESULT "
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class BenchError(RuntimeError):
    """A measured job failed: the command, its exit code and the tail of its output."""


@dataclass(frozen=True)
class Mode:
    """How long a run is allowed to take. Every figure is a median over ``repeats`` timed
    repetitions after ``warmup`` untimed ones; job-level comparisons alternate ``rounds`` times."""

    name: str
    repeats: int
    warmup: int
    rounds: int
    sizes: tuple[int, ...]           # collective message sizes, bytes
    latency_sizes: tuple[int, ...]   # small messages, bytes
    steps: int                       # training steps per timed block
    blocks: int                      # timed blocks per training job (after a warm-up block)
    epochs: int                      # convergence runs
    caps_mbit: tuple[Optional[float], ...]  # testbed link caps (None: uncapped)


KB, MB = 1024, 1024 * 1024
QUICK = Mode("quick", repeats=5, warmup=2, rounds=2,
             sizes=(4 * KB, 64 * KB, 1 * MB, 4 * MB, 16 * MB, 64 * MB), latency_sizes=(4, 256, 4 * KB),
             steps=15, blocks=2, epochs=6, caps_mbit=(100.0, 1000.0, None))
FULL = Mode("full", repeats=9, warmup=3, rounds=4,
            sizes=tuple(4 * KB * 2 ** i for i in range(15)), latency_sizes=(4, 64, 256, 1 * KB, 4 * KB),
            steps=25, blocks=3, epochs=20, caps_mbit=(100.0, 1000.0, 10000.0, None))
MODES = {"quick": QUICK, "full": FULL}


def emit(obj: Any) -> None:
    """A job's rank 0 reports its figures (any JSON-able object)."""
    print(MARK + json.dumps(obj), flush=True)


def median_range(s: Optional[dict], spec: str, scale: float = 1.0, runs: Optional[int] = None) -> str:
    """A :func:`summary` as "median [min..max]" (and how many of ``runs`` it holds), or "not
    reached" for None."""
    if s is None:
        return "not reached"
    text = format(s["median"] * scale, spec)
    if s["n"] > 1:
        text += f" [{format(s['min'] * scale, spec)}..{format(s['max'] * scale, spec)}]"
    return text + (f" ({s['n']}/{runs} runs)" if runs and s["n"] < runs else "")


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median with its spread: the figure every table shows."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no values")
    q = statistics.quantiles(vals, n=4) if len(vals) >= 2 else [vals[0]] * 3
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "q1": q[0], "q3": q[2], "n": len(vals), "values": vals}


def epoch_throughputs(run_dir: str) -> list[float]:
    """Samples/s of every epoch a trainer run wrote to ``run_dir/metrics.jsonl`` after the first
    (the warm-up). Only rank 0 writes that file, so only rank 0 may call this."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["epoch_samples_per_sec"] for line in lines[1:]]


def timed(fn: Callable[[], None], warmup: int, repeats: int, iters: int = 1,
          barrier: Optional[Callable[[], None]] = None) -> list[float]:
    """Seconds per call of ``fn``: ``warmup`` untimed rounds, then ``repeats`` timed rounds of
    ``iters`` calls each (``barrier`` before every round, so ranks start together)."""
    out = []
    for r in range(warmup + repeats):
        if barrier:
            barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if r >= warmup:
            out.append((time.perf_counter() - t0) / iters)
    return out


def iters_for(nbytes: int, budget_bytes: int = 64 * MB, cap: int = 200) -> int:
    """Back-to-back calls per timed round (a barrier only before the round, as nccl-tests and
    OSU time their loops): enough that a small message's round is not one timer tick, and at
    least 4 up to 16 MB, so a round times the op and not how far the barrier left the ranks apart."""
    return max(1, min(cap, budget_bytes // max(1, nbytes)))


def save_plot(fig, path: Path) -> None:
    """Lay out, write (PNG, 110 dpi) and close one matplotlib figure; ``path``'s folder is made."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict[str, Any]:
    """Where and with what the figures were measured."""
    import platform

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cores": os.cpu_count(), "affinity": len(os.sched_getaffinity(0))}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["mem_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (OSError, ValueError):
        pass
    for name in ("torch", "numpy", "mpi4py", "horovod"):
        try:
            mod = __import__(name)
            info[name] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001 - record what is there
            info[name] = None
    try:
        out = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=30).stdout
        info["mpi"] = out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        info["mpi"] = None
    return info


def job_env(extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The parent's environment without Horovod's and the MPI yield knobs (each variant states
    its own), one thread per rank, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HOROVOD_") and k != "OMPI_MCA_mpi_yield_when_idle"}
    env.update(ONE_THREAD)
    env.update(extra or {})
    # this Python's scripts first (horovodrun, hvd-train), as when the venv is activated
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return env


@dataclass
class Bench:
    """One ``hvd-bench`` run: its mode, where it writes, its progress bar."""

    mode: Mode
    out: Path
    progress: Any = None            # a tqdm bar (or None)
    log_lines: list[str] = field(default_factory=list)
    _scratch: Any = None

    def log(self, msg: str) -> None:
        self.log_lines.append(msg)
        if self.progress is not None:
            self.progress.write(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    def scratch(self) -> str:
        """A fresh folder for one job's run_dir (every rank of a job must name the same one);
        removed when the run ends."""
        import tempfile

        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="hvd-bench-")
        return tempfile.mkdtemp(dir=self._scratch.name)

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    def tick(self, desc: str) -> None:
        if self.progress is not None:
            self.progress.set_postfix_str(desc[:60])
            self.progress.update(1)

    def job(self, module: str, args: Sequence[str], np: int, env: Optional[Mapping[str, str]] = None,
            launcher: str = "mpirun", timeout: float = 900, desc: str = "", command: Optional[Callable] = None,
            **mpirun_kwargs) -> Any:
        """Start ``python -m benchmarks.<module> --job <args>`` on ``np`` ranks and return rank
        0's ``BENCH_RESULT``. ``launcher``: ``mpirun`` (Open MPI) or ``horovodrun-gloo``
        (Horovod's Gloo controller, no MPI). ``command``: build the launch line yourself
        (``command(np, program, env)``, e.g. on testbed hosts)."""
        from mpi_jobs import horovodrun_command, mpirun_command

        program = [sys.executable, "-m", f"benchmarks.{module}", "--job", *args]
        full_env = job_env(env)
        if command is not None:
            cmd = command(np, program, dict(ONE_THREAD, **(env or {})))
        elif launcher == "mpirun":
            from hvd_trainer.runtime.launch_env import usable_cores

            mpirun_kwargs.setdefault("bind_to", "core" if np <= usable_cores() else "none")
            cmd = mpirun_command(np, program, env=dict(ONE_THREAD, **(env or {})), **mpirun_kwargs)
        elif launcher == "horovodrun-gloo":
            cmd = horovodrun_command(np, program, hosts={"localhost": np}, gloo=True, **mpirun_kwargs)
        else:
            raise ValueError(f"launcher: {launcher!r}")
        t0 = time.monotonic()
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                                 start_new_session=True)
        except subprocess.TimeoutExpired as err:
            raise BenchError(f"timed out after {timeout:.0f} s: {' '.join(cmd)}") from err
        except OSError as err:  # the launcher is missing
            raise BenchError(f"could not start {cmd[0]}: {err}") from err
        finally:
            self.tick(desc or module)
        for line in res.stdout.splitlines():
            if MARK in line:  # horovodrun prefixes "[rank]<stdout>:"
                return json.loads(line.split(MARK, 1)[1])
        raise BenchError(f"job failed (exit {res.returncode}, {time.monotonic() - t0:.0f} s): {' '.join(cmd)}\n"
                         f"{res.stdout[-1500:]}\n{res.stderr[-2500:]}")


def init_gloo():
    """torch.distributed over gloo on this mpirun job's ranks (rank 0 picks a free loopback
    port and tells the others): the baseline a user would otherwise pick. Returns the MPI
    communicator."""
    import socket

    import torch.distributed as dist
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    port = None
    if comm.rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = comm.bcast(port, root=0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=comm.rank, world_size=comm.size)
    return comm


def busbw(nbytes: int, seconds: float, n: int) -> float:
    """nccl-tests' bus bandwidth of an allreduce, bytes/s: algbw x 2(n-1)/n."""
    return nbytes / seconds * 2 * (n - 1) / n
