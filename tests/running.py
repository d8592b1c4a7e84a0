"""A launcher job running in the background, for tests that act on it while it trains: signal
one rank, stop one, kill one, then check how the job ends. Everything has a deadline, and the
whole process group is killed at the end, whatever happened."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import psutil

from conftest import BIN


class RunningJob:
    """``with RunningJob(cmd) as job: ...``; ``job.ranks(n)`` maps each rank to its process."""

    def __init__(self, cmd: Sequence[str], env: Optional[dict] = None, program_marker: str = "") -> None:
        self.cmd = list(cmd)
        self.env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", PYTHONUNBUFFERED="1", **(env or {}))
        self.marker = program_marker  # a word of the rank program's command line
        self.proc: Optional[subprocess.Popen] = None
        self.stdout = self.stderr = ""

    def __enter__(self) -> "RunningJob":
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=self.env, start_new_session=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # a stopped rank, or survivors of a failure
        self._collect(30)

    def _collect(self, timeout: float) -> None:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            out, err = self.proc.communicate()
        self.stdout, self.stderr = self.stdout + (out or ""), self.stderr + (err or "")

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    # generous deadlines: on one slow core, 4 ranks take a minute to start and train an epoch
    def ranks(self, np: int, timeout: float = 180) -> dict[int, psutil.Process]:
        """The processes that run the program, by their MPI rank."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = {}
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                try:
                    rank = child.environ().get("OMPI_COMM_WORLD_RANK")
                    cmdline = child.cmdline()
                    runs_program = len(cmdline) > 1 and cmdline[1].endswith(self.marker)  # not a wrapper
                except psutil.Error:
                    continue
                if rank is not None and runs_program:
                    found[int(rank)] = child
            if len(found) == np:
                return found
            assert self.proc.poll() is None, f"the job ended before its ranks were seen\n{self.stderr_now()}"
            time.sleep(0.1)
        raise AssertionError(f"ranks did not start within {timeout}s")

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert self.proc.poll() is None, f"the job ended before {what}\n{self.stderr_now()}"
            assert time.monotonic() < deadline, f"no {what} within {timeout}s"
            time.sleep(0.05)

    def wait(self, timeout: float) -> Optional[int]:
        """The launcher's exit code, or None if it is still running after ``timeout``."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self._collect(30)
        return self.proc.returncode

    def stderr_now(self) -> str:
        if self.proc.poll() is not None:
            self._collect(10)
        return self.stderr[-3000:]


def metrics_rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0
