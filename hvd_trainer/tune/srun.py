"""``launch: srun``: hvd-tune is one process inside an allocation (an sbatch script runs it,
not srun), and each trial is an ``srun`` step of ranks_per_trial tasks, up to
SLURM_NTASKS / ranks_per_trial at a time. Sites that account, limit or kill per step get a step
per trial; the trial steps run :mod:`.trial`.

A stop signal is passed on to the running steps, which checkpoint their trials and exit 75;
then no step starts and hvd-tune exits 75. A step that ends otherwise than with 0 or 75 lost a
rank or crashed: no new trial starts and the study ends with exit 1, naming the trial.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from ..config import ConfigError
from ..runtime.control import StopSignals
from ..runtime.errors import EXIT_PREEMPTED
from . import storage
from .study import StudyConfig


def slots(cfg: StudyConfig, environ: Optional[dict] = None) -> int:
    env = os.environ if environ is None else environ
    if "SLURM_NTASKS" not in env:
        raise ConfigError("launch: srun runs inside a SLURM allocation (sbatch or salloc): SLURM_NTASKS is not set")
    n = int(env["SLURM_NTASKS"])
    if n < cfg.ranks_per_trial:
        raise ConfigError(f"ranks_per_trial: {cfg.ranks_per_trial} is more than the allocation's {n} tasks")
    return n // cfg.ranks_per_trial


def step_command(cfg: StudyConfig, study_file: str, overrides: list[str], number: int, params: dict) -> list[str]:
    # --exact: the step takes only its own tasks' CPUs, so the other trials' steps can start
    # --kill-on-bad-exit: a task that fails before its first collective must not leave the
    # others of the step waiting in it
    return (["srun", f"--ntasks={cfg.ranks_per_trial}", "--mpi=pmix", "--cpus-per-task=1", "--exact",
             "--kill-on-bad-exit=1",
             f"--job-name=trial-{number}", *cfg.srun_args, sys.executable, "-m", "hvd_trainer.tune.trial",
             str(Path(study_file).resolve()), str(number), json.dumps(params), *overrides])


def run_srun(cfg: StudyConfig, base_dir: Path, study_file: str, overrides: list[str], stop_signals: list[str]) -> int:
    width = slots(cfg)
    folder = storage.study_dir(cfg)
    study = storage.open_study(cfg, folder)
    pending = [t.number for t in storage.interrupted(study)]
    deadline = time.monotonic() + cfg.time_budget_s if cfg.time_budget_s else None
    signals = StopSignals(stop_signals)
    running: dict[int, subprocess.Popen] = {}
    failed: list[str] = []
    preempted = forwarded = exhausted = False
    try:
        while True:
            for number, proc in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[number]
                if rc == EXIT_PREEMPTED:
                    preempted = True
                elif rc != 0:
                    failed.append(f"trial {number}'s srun step exited {rc} (a lost or failed rank: its output "
                                  f"names it)")
            if signals.received and not forwarded:
                for proc in running.values():  # srun passes it on to the step's tasks
                    proc.send_signal(getattr(signal, signals.received))
                forwarded = True
            stop = bool(signals.received) or preempted or bool(failed)
            while not stop and not exhausted and len(running) < width:
                handle, params = storage.claim(study, cfg, folder, deadline, pending)
                if handle is None:
                    exhausted = True
                    break
                number = handle.number
                print(f"hvd-tune: trial {number}: srun step: " + ", ".join(f"{k}={v}" for k, v in params.items()),
                      file=sys.stderr, flush=True)
                running[number] = subprocess.Popen(step_command(cfg, study_file, overrides, number, params))
            if not running and (stop or exhausted):
                break
            time.sleep(0.2)
    except BaseException:
        for proc in running.values():  # no step outlives the study that started it
            proc.terminate()
        for proc in running.values():
            proc.wait()
        raise
    finally:
        signals.restore()
    from .results import write_results

    write_results(storage.open_study(cfg, folder), cfg, folder, base_dir)
    for line in failed:
        print(f"hvd-tune: {line}; the study stops", file=sys.stderr, flush=True)
    if failed:
        return 1
    return EXIT_PREEMPTED if preempted or signals.received else 0
