"""``hvd-tune STUDY.yaml [KEY=VALUE ...]`` — a hyper-parameter search packed into one allocation.

    mpirun -np 4 hvd-tune digits-study.yaml                # 4 ranks, ranks_per_trial groups
    srun --mpi=pmix hvd-tune study.yaml                    # the same inside sbatch
    hvd-tune study.yaml launch=srun                        # one process; each trial an srun step
    hvd-tune study.yaml --results                          # only rewrite the tables and plots

Overrides set study keys (``trials=8``, ``sampler=grid``). A bad study file, or a base config
that is invalid before any parameter is applied, prints one line naming the key and exits 2 on
every rank. Exit 75 after a stop signal: rerun the same command to resume the study.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

from ..config import ConfigError, from_dict
from ..config.loading import parse_overrides
from ..runtime.launch_env import launcher_rank
from .space import trial_tree
from .storage import open_study, study_dir
from .study import load_study


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="hvd-tune", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="the study file (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="study keys to override")
    parser.add_argument("--results", action="store_true", help="rewrite the results from the journal and exit")
    args = parser.parse_args(argv)
    rank = launcher_rank()
    try:
        cfg, base_dir = load_study(args.study, parse_overrides(args.overrides))
        # the base alone must be a valid training config: a typo there would fail every trial
        base = from_dict(trial_tree(cfg, base_dir, {}, study_dir(cfg) / "base"))
        if cfg.metric == "test_perplexity" and base.data.name != "text":
            raise ConfigError(f"metric: test_perplexity is scored on data.name: text only (the base trains on "
                              f"{base.data.name})")
        if args.results:
            if rank == 0:  # under a launcher, one writer
                from .results import write_results
                write_results(open_study(cfg, study_dir(cfg)), cfg, study_dir(cfg), base_dir)
            return 0
        if cfg.launch == "srun":
            from .srun import run_srun
            return run_srun(cfg, base_dir, args.study, args.overrides, list(base.checkpoint.stop_signals))
        from .packed import run_packed
        return run_packed(cfg, base_dir, base)
    except ConfigError as err:
        if rank == 0:
            print(f"hvd-tune: config error: {err}", file=sys.stderr, flush=True)
        else:
            time.sleep(2.0)  # rank 0's line out before a launcher ends the job on this exit
        return 2


if __name__ == "__main__":
    sys.exit(main())
