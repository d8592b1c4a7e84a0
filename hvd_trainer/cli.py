"""``hvd-train CONFIG [KEY=VALUE ...]`` — the command-line entry point.

    mpirun -np 2 hvd-train digits                      # built-in config by name
    horovodrun -np 2 -H localhost:2 hvd-train my.yaml optim.lr=0.1
    srun --mpi=pmix hvd-train my.yaml strategy=ddp
    hvd-train digits epochs=1                           # one plain process (world size 1)

A bad config prints one line naming the key and exits 2 on every rank, before any collective.
Any other failure on one rank prints its traceback and brings the whole job down (MPI_Abort),
so no rank waits forever for a dead peer.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

from .config import ConfigError, load_config

BUILTIN = Path(__file__).with_name("configs")


def launcher_rank() -> int:
    """This process's rank as the launcher tells it (before any communication starts)."""
    for var in ("OMPI_COMM_WORLD_RANK", "HOROVOD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID", "RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def resolve_config(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    builtin = BUILTIN / f"{name}.yaml"
    if builtin.is_file():
        return builtin
    names = ", ".join(sorted(p.stem for p in BUILTIN.glob("*.yaml")))
    raise ConfigError(f"config: no file {name!r} and no built-in config of that name (built-in: {names})")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="hvd-train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config file, or a built-in name (digits, cnn_synthetic)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted-key overrides")
    args = parser.parse_args(argv)
    rank = launcher_rank()

    def fail_config(err: ConfigError) -> int:
        # Every rank reaches the same verdict; rank 0 says it once. The others leave a moment
        # later, so a launcher that kills the job on the first non-zero exit cannot cut rank 0
        # off before its line is out.
        if rank == 0:
            print(f"hvd-train: config error: {err}", file=sys.stderr, flush=True)
        else:
            time.sleep(2.0)
        return 2

    try:
        cfg = load_config(resolve_config(args.config), args.overrides)
    except ConfigError as err:
        return fail_config(err)

    from .trainer import Trainer  # heavy imports only once the config is known good

    trainer = None
    try:
        trainer = Trainer(cfg)
        trainer.fit()
    except ConfigError as err:  # raised identically on every rank, before any collective
        return fail_config(err)
    except BaseException as err:  # noqa: BLE001 - any failure must take the job down, not hang it
        if isinstance(err, SystemExit) and not err.code:
            raise
        sys.stdout.flush()
        print(f"hvd-train: rank {rank} failed: {type(err).__name__}: {err}", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        if trainer is not None:
            trainer.strategy.abort(1)
        os._exit(1)
    if trainer is not None:
        trainer.close()
        trainer.strategy.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
