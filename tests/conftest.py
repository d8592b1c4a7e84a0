"""Shared fixtures: launching real multi-rank jobs with a hard timeout.

A hung job is killed (its whole process group) and reported as a failure with its output,
so a deadlock can never stall the suite.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import pytest
import torch

from mpi_jobs import mpirun_command

REPO = Path(__file__).resolve().parents[1]
WORKER = str(REPO / "tests" / "parallel" / "worker.py")
BIN = Path(sys.executable).parent


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
    mpirun(np, [sys.executable, WORKER, f"run_dir={run_dir}", "runtime.progress=false", *overrides],
           timeout=timeout, env=env)
    return [torch.load(run_dir / f"params_rank{r}.pt", weights_only=True) for r in range(np)
            if (run_dir / f"params_rank{r}.pt").exists()]


def summary(run_dir: Path) -> dict:
    import json
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def assert_same(a: dict, b: dict, exact: bool = False, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), f"{name} differs (max {((a[name] - b[name]).abs().max())})"
        else:
            torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
