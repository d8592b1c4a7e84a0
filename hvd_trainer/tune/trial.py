"""One trial as its own job: ``python -m hvd_trainer.tune.trial STUDY.yaml NUMBER PARAMS_JSON
[KEY=VALUE ...]``, every rank of an ``srun`` step that ``launch: srun`` starts. Rank 0 opens the
study's journal (a shared file system holds it), reports to the pruner and records the outcome.

Exit 0 once the trial is recorded (complete, pruned or failed), 75 after a stop signal (the
trial stays running, to be resumed), 2 for a study file that does not load.
"""
from __future__ import annotations

import json
import sys
from typing import Optional

from ..config import ConfigError
from ..config.loading import parse_overrides
from ..runtime.errors import EXIT_PREEMPTED
from ..runtime import world
from ..runtime.launch_env import apply_mpi_defaults, launcher_rank, launcher_size
from .storage import open_study, resume_trial, study_dir, trial_dir
from .study import load_study
from .trials import PREEMPTED, printer, record, run_point


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    study_file, number, params = args[0], int(args[1]), json.loads(args[2])
    rank = launcher_rank()
    try:
        cfg, base_dir = load_study(study_file, parse_overrides(args[3:]))
    except ConfigError as err:
        print(f"hvd-tune: trial {number}: config error: {err}", file=sys.stderr, flush=True)
        return 2
    folder = study_dir(cfg)
    say = printer(f"trial {number}")
    study = open_study(cfg, folder) if rank == 0 else None
    handle = resume_trial(study, number) if rank == 0 else None
    run_dir = trial_dir(folder, number)
    apply_mpi_defaults()
    from mpi4py import MPI

    # the step is the trial's whole job, but a confined run fails its trial on a NaN where a
    # plain hvd-train run would end the job
    with world.confined(MPI.COMM_WORLD, f"trial {number}"):
        outcome = run_point(cfg, base_dir, params, run_dir, handle, say)
    if rank == 0:
        record(study, handle, outcome, str(run_dir), list(range(launcher_size())))
        say(outcome.describe(cfg.metric))
    return EXIT_PREEMPTED if outcome.state == PREEMPTED else 0


if __name__ == "__main__":
    sys.exit(main())
