"""``hvd-train CONFIG [KEY=VALUE ...]`` — the command-line entry point.

    mpirun -np 2 hvd-train digits                      # built-in config by name
    horovodrun -np 2 -H localhost:2 hvd-train my.yaml optim.lr=0.1
    srun --mpi=pmix hvd-train my.yaml strategy=ddp
    hvd-train digits epochs=1                           # one plain process (world size 1)

A bad config prints one line naming the key and exits 2 on every rank, before any collective.
Any other failure on one rank prints its traceback and brings the whole job down (see
:func:`hvd_trainer.runner.train`), so no rank waits forever for a dead peer.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

from .config import BUILTIN, ConfigError, load_config
from .runtime.errors import NonFiniteError
from .runtime.launch_env import launcher_rank

def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN.glob("*.yaml"))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="hvd-train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help=f"YAML config file, or a built-in name ({', '.join(builtin_names())})")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted-key overrides")
    args = parser.parse_args(argv)
    rank = launcher_rank()
    try:
        cfg = load_config(args.config, args.overrides)
        from .runner import train  # heavy imports only once the config is known good

        train(cfg)
    except NonFiniteError as err:  # a single process; under a launcher train() ends the job
        print(f"hvd-train: {err}", file=sys.stderr, flush=True)
        return 1
    except ConfigError as err:
        # Every rank reaches the same verdict; rank 0 says it once. The others leave a moment
        # later, so a launcher that kills the job on the first non-zero exit cannot cut rank 0
        # off before its line is out.
        if rank == 0:
            print(f"hvd-train: config error: {err}", file=sys.stderr, flush=True)
        else:
            time.sleep(2.0)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
