"""Shared fixtures: launching real multi-rank jobs with a hard timeout, test tiers, and a
guard against leftover processes.

- A hung job is killed (its whole process group) and reported as a failure with its output, so
  a deadlock can never stall the suite.
- Tiers follow the layout: ``tests/unit`` (one process, seconds), ``tests/parallel`` (mpirun,
  horovodrun), ``tests/integration`` (SLURM daemons, hosts, containers). Each test is marked
  with its tier: ``pytest -m unit`` or ``pytest -m "not integration"`` while developing.
- Every process a test starts inherits a tag in its environment. A test that leaves a tagged
  process running (a stray rank, a daemon) fails, and the process is killed; at the end of the
  session, any process of the session still alive (a SLURM or munge daemon a fixture forgot)
  fails the run. So a second run of the suite starts from a clean machine.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import psutil
import pytest
import torch

from mpi_jobs import mpirun_command

REPO = Path(__file__).resolve().parents[1]
WORKER = str(REPO / "tests" / "parallel" / "worker.py")
BIN = Path(sys.executable).parent
SESSION_VAR, TEST_VAR = "HVD_TRAINER_TEST_SESSION", "HVD_TRAINER_TEST_TAG"
_SESSION_TAG = uuid.uuid4().hex[:12]
os.environ[SESSION_VAR] = _SESSION_TAG  # inherited by everything the suite starts


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).relative_to(REPO / "tests").parts
        if parts[0] in ("unit", "parallel", "integration"):
            item.add_marker(getattr(pytest.mark, parts[0]))


def _own_multiprocessing_helper(p: psutil.Process, me: int) -> bool:
    """This pytest process's own forkserver or resource tracker (started when a unit test's
    DataLoader starts workers): each ends when its parent does, as they do in a training rank."""
    cmd = " ".join(p.cmdline())
    return p.ppid() == me and ("from multiprocessing.forkserver import" in cmd
                               or "from multiprocessing.resource_tracker import" in cmd)


def _tagged(var: str, value: str) -> list[psutil.Process]:
    me = os.getpid()
    found = []
    for p in psutil.process_iter(["pid"]):
        if p.pid == me:
            continue
        try:
            if p.environ().get(var) == value and p.status() != psutil.STATUS_ZOMBIE \
                    and not _own_multiprocessing_helper(p, me):
                found.append(p)
        except psutil.Error:
            continue
    return found


def _reap(var: str, value: str, grace: float) -> list[str]:
    """Kill processes still tagged ``var=value`` after ``grace`` seconds; describe them."""
    deadline = time.monotonic() + grace
    left = _tagged(var, value)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _tagged(var, value)
    described = []
    for p in left:
        try:
            described.append(f"pid {p.pid}: {' '.join(p.cmdline())[:200]}")
            p.kill()
        except psutil.Error:
            continue
    return described


@pytest.fixture(autouse=True)
def _no_leftover_processes(request):
    """Fails a test that leaves processes behind (after killing them)."""
    if request.node.get_closest_marker("unit"):
        yield
        return
    tag = uuid.uuid4().hex[:12]
    os.environ[TEST_VAR] = tag
    try:
        yield
    finally:
        del os.environ[TEST_VAR]
    left = _reap(TEST_VAR, tag, grace=10.0)
    if left:
        pytest.fail("left processes running (killed now):\n" + "\n".join(left))


def pytest_sessionfinish(session, exitstatus):
    left = _reap(SESSION_VAR, _SESSION_TAG, grace=5.0)
    if left:
        print("\nconftest: processes of this test session were still running (killed now):\n"
              + "\n".join(left), file=sys.stderr)
        session.exitstatus = 1


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cmd(cmd: Sequence[str], timeout: float = 180, env: Optional[dict] = None, cwd=None) -> Result:
    """Run ``cmd`` in its own process group; on timeout kill the group and fail the test."""
    full_env = dict(os.environ)
    full_env["PATH"] = f"{BIN}:{full_env.get('PATH', '')}"
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    full_env.update(env or {})
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s (a hang): {' '.join(cmd)}\n--- stdout\n{out[-3000:]}\n"
                    f"--- stderr\n{err[-3000:]}")
    return Result(proc.returncode, out, err)


def mpirun(np: int, program: Sequence[str], timeout: float = 180, env: Optional[dict] = None,
           check: bool = True, **kwargs) -> Result:
    res = run_cmd(mpirun_command(np, program, **kwargs), timeout=timeout, env=env)
    if check and res.returncode != 0:
        pytest.fail(f"mpirun -np {np} {' '.join(program)} exited {res.returncode}\n{res.output[-4000:]}")
    return res


def train_params(np: int, run_dir: Path, overrides: Sequence[str], timeout: float = 180,
                 env: Optional[dict] = None) -> list[dict[str, torch.Tensor]]:
    """Train with the worker script under mpirun; return every worker rank's final state_dict
    (parameter-server ranks hold no model and write none)."""
    return train_run(np, run_dir, overrides, timeout, env)[0]


def train_run(np: int, run_dir: Path, overrides: Sequence[str], timeout: float = 180,
              env: Optional[dict] = None) -> tuple[list[dict[str, torch.Tensor]], Result]:
    """:func:`train_params`, and the job's output (to check what the run said it did)."""
    res = mpirun(np, [sys.executable, WORKER, f"run_dir={run_dir}", "runtime.progress=false", *overrides],
                 timeout=timeout, env=env)
    return [torch.load(run_dir / f"params_rank{r}.pt", weights_only=True) for r in range(np)
            if (run_dir / f"params_rank{r}.pt").exists()], res


def train_local(run_dir: Path, overrides: Sequence[str]) -> dict[str, torch.Tensor]:
    """The one-process reference, in this process (``strategy=single``: no launcher, no
    communication, one thread): the final state_dict. A reference run costs a second, not a job."""
    from hvd_trainer import load_config, train
    from hvd_trainer.strategies.base import unwrap

    cfg = load_config(None, [*overrides, "strategy=single", "runtime.threads=1", "runtime.progress=false",
                             f"run_dir={run_dir}"])
    out: dict[str, dict[str, torch.Tensor]] = {}
    threads = torch.get_num_threads()
    try:
        train(cfg, on_end=lambda t: out.update(w={k: v.detach().clone()
                                                  for k, v in unwrap(t.state.model).state_dict().items()}))
    finally:
        torch.set_num_threads(threads)
    return out["w"]


def assert_resumed(output: str, run_dir: Path, step: int) -> None:
    """The run in ``run_dir`` (``output``: what it printed) restored its checkpoint of ``step``
    before training: without this, a resume that silently did nothing would retrain from scratch
    and, with the same seed, end bit-identical to the uninterrupted run all the same."""
    checkpoint = run_dir / "checkpoints" / f"ckpt-step{step:09d}.pt"
    said = [line for line in output.splitlines() if line.startswith("resumed from ")]
    assert len(said) == 1 and said[0].startswith(f"resumed from {checkpoint} at step {step} "), \
        f"expected one 'resumed from {checkpoint} at step {step}' line, got {said}\n{output[-3000:]}"
    assert summary(run_dir)["resumed_from_step"] == step


def summary(run_dir: Path) -> dict:
    import json
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


# Equivalence across rank counts or strategies (2 ranks x b vs 1 rank x 2b, Horovod vs DDP, PS vs
# allreduce) holds up to float32 rounding: the two runs sum the same numbers in another order.
# That difference is ~1e-8 per SGD step here (measured: 1.2e-7 after 10 steps, 6e-7 after 40 on
# the ResNet, 1.8e-7 after 60 on the MLP) and grows linearly, until the dynamics start to amplify
# it: on another CPU the ResNet's gap stayed ~1e-6 for 60 steps, then grew ~500x every 4 steps.
# So equivalence runs stop at EQUIV_STEPS optimizer steps, well inside that horizon, and compare
# with EQUIV_ATOL: > 15x the rounding expected there on any CPU, while a real bug (a rank left out
# of the average, a wrong lr or clip) moves the weights by 1e-3 or more within a few steps.
EQUIV_STEPS = 40
EQUIV_ATOL = 1e-5
EQUIV_RTOL = 1e-4


def assert_same(a: dict, b: dict, exact: bool = False, rtol: float = EQUIV_RTOL, atol: float = EQUIV_ATOL) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), f"{name} differs (max {((a[name] - b[name]).abs().max())})"
        else:
            torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
