"""``hvd-launch``: start a program on N ranks with mpirun, horovodrun or srun.

    hvd-launch -np 2 -- hvd-train digits
    hvd-launch --launcher horovodrun --gloo -np 2 -- hvd-train digits strategy=horovod
    hvd-launch --launcher srun -np 4 -- hvd-train my.yaml
    hvd-launch -np 4 --hosts node1:2,node2:2 --tcp-subnet 198.18.0.0/24 -- hvd-train my.yaml
    hvd-launch --dry-run -np 2 -- hvd-train digits     # print the argument list only
    hvd-launch --sbatch job.sh -np 8 --nodes 2 -- hvd-train my.yaml   # write a SLURM batch script
    hvd-launch -np 2 --container hvd-trainer --runtime charliecloud -- hvd-train digits  # in an image
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from typing import Optional

from . import containers
from .commands import horovodrun_command, mpirun_command, share_cores, srun_command


def _hosts(spec: Optional[str]) -> Optional[dict[str, int]]:
    if not spec:
        return None
    out = {}
    for item in spec.split(","):
        host, _, slots = item.partition(":")
        out[host] = int(slots or 1)
    return out


def build(args: argparse.Namespace) -> list[str]:
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    container = containers.from_args(args)
    if container:
        program = container.wrap(program)
    if args.launcher == "mpirun":
        return mpirun_command(args.np, program, hosts=_hosts(args.hosts), map_by=args.map_by,
                              tcp_subnet=args.tcp_subnet,
                              **(containers.mpirun_settings(container) if container else {}))
    if args.launcher == "horovodrun":
        return horovodrun_command(args.np, program, hosts=_hosts(args.hosts), gloo=args.gloo,
                                  network_interfaces=args.network_interfaces.split(",") if args.network_interfaces else ())
    return srun_command(args.np, program, nodes=args.nodes)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="hvd-launch", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--launcher", choices=["mpirun", "horovodrun", "srun"],
                   help="default: mpirun to run now, srun inside an --sbatch script")
    p.add_argument("-np", type=int, help="number of ranks (with --testbed: default one per host)")
    p.add_argument("--hosts", help="host:slots,host:slots")
    p.add_argument("--map-by", help="mpirun --map-by value (e.g. ppr:1:node)")
    p.add_argument("--tcp-subnet", help="restrict MPI traffic to this subnet (multi-host)")
    p.add_argument("--gloo", action="store_true", help="horovodrun: Gloo controller")
    p.add_argument("--network-interfaces", help="horovodrun: interfaces common to all hosts")
    p.add_argument("--nodes", type=int, help="srun: number of nodes")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    p.add_argument("--sbatch", metavar="FILE", help="write a SLURM batch script (srun or --launcher mpirun) to FILE")
    p.add_argument("--time", default="01:00:00", help="--sbatch: wall-clock limit")
    p.add_argument("--signal-seconds", type=int, default=120, metavar="N",
                   help="--sbatch: SLURM sends SIGUSR1 N seconds before the time limit; the ranks stop "
                        "together with a checkpoint and the job is requeued (0: no warning signal)")
    p.add_argument("--no-requeue", action="store_true",
                   help="--sbatch: do not ask SLURM to requeue the job after preemption or node failure")
    containers.add_arguments(p)
    p.add_argument("--testbed", type=int, metavar="N",
                   help="rehearse a multi-node run here: start N namespace hosts (root), run mpirun "
                        "(or horovodrun --gloo) across them from the first, tear them down")
    p.add_argument("--testbed-rate-mbit", type=float, metavar="R", help="--testbed: cap every host's link at R Mbit/s")
    p.add_argument("program", nargs=argparse.REMAINDER, help="-- program and its arguments")
    args = p.parse_args(argv)
    try:
        containers.from_args(args)
    except ValueError as e:
        p.error(str(e))
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        p.error("no program given (hvd-launch ... -- PROGRAM ARGS)")
    if args.testbed:
        if args.sbatch or args.hosts or args.launcher == "srun":
            p.error("--testbed makes its own hosts: no --hosts, --sbatch or srun")
        return _on_testbed(args, program)
    if args.np is None:
        p.error("-np is required")
    if args.sbatch:
        from .slurm import BatchJob

        if args.launcher == "horovodrun" or args.gloo or args.network_interfaces or args.tcp_subnet:
            p.error("--sbatch writes srun or mpirun jobs: --launcher horovodrun, --gloo, "
                    "--network-interfaces and --tcp-subnet do not apply")
        launcher = "mpirun" if args.launcher == "mpirun" else "srun"
        if args.map_by and launcher != "mpirun":
            p.error("--map-by is an mpirun option: add --launcher mpirun")
        hosts = list(_hosts(args.hosts) or {})
        job = BatchJob(program=program, ntasks=args.np, nodes=args.nodes or (len(hosts) or None),
                       time=args.time, launcher=launcher, nodelist=hosts, map_by=args.map_by,
                       requeue_on_preempt=not args.no_requeue, signal_seconds=args.signal_seconds,
                       container=containers.from_args(args))
        if args.dry_run:
            sys.stdout.write(job.script())
            return 0
        with open(args.sbatch, "w") as f:
            f.write(job.script())
        print(f"wrote {args.sbatch}: sbatch {args.sbatch}", file=sys.stderr)
        return 0
    args.launcher = args.launcher or "mpirun"
    cmd = build(args)
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    if args.dry_run:
        return 0
    problem = containers.preflight(args, args.launcher)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    os.execvp(cmd[0], cmd)
    return 127  # not reached


def _on_testbed(args: argparse.Namespace, program: list[str]) -> int:
    """Start a testbed of ``args.testbed`` hosts, run the launcher on its first host with
    ``np / hosts`` ranks per host, and tear it down whatever happens (Ctrl-C included). All
    ``np`` ranks run on this machine's cores, so they share them out (:func:`share_cores`)."""
    from .testbed import Testbed

    n = args.testbed
    np = args.np or n
    if np % n:
        print(f"hvd-launch: -np {np} is not a multiple of --testbed {n}", file=sys.stderr)
        return 2
    tb = Testbed(hosts_count=n, rate_mbit=args.testbed_rate_mbit)
    program, env = share_cores(program, np)
    horovodrun = args.launcher == "horovodrun"

    def command() -> list[str]:
        if horovodrun:  # Gloo: MPI's flags are ours; horovodrun passes its environment on
            return tb.horovodrun_command(program, slots=np // n)
        return tb.mpirun_command(program, slots=np // n, map_by=args.map_by, env=env)

    def shown(cmd: list[str]) -> str:
        return "+ " + "".join(f"{k}={v} " for k, v in env.items() if horovodrun) + shlex.join(cmd)

    if args.dry_run:
        tb.layout(0)  # the names and subnet of the first free testbed
        print(shown(command()), file=sys.stderr)
        return 0
    with tb:
        print(f"hvd-launch: testbed of {n} hosts ({', '.join(f'{h.name}={h.address}' for h in tb.hosts)}, "
              f"interface eth0, subnet {tb.subnet}); running on {tb.hosts[0].name}", file=sys.stderr)
        cmd = command()
        print(shown(cmd), file=sys.stderr, flush=True)
        try:
            return subprocess.run(tb.on_host(tb.hosts[0], cmd), env={**os.environ, **env}).returncode
        except KeyboardInterrupt:  # the ranks got the Ctrl-C too; the testbed goes with ``with``
            print("hvd-launch: interrupted, tearing the testbed down", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
