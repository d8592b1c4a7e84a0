"""Mutation checks: break the product on purpose, one way at a time, and see the tests that
promise to notice fail; then put the file back and see them pass.

    python tests/mutations.py                 # every mutation below
    python tests/mutations.py --list          # names, files, whether each anchor is found
    python tests/mutations.py --only restore_noop --only bf16_ignored
    python tests/mutations.py --no-revert-check   # skip the second run on the restored tree

Each mutation replaces one exact text (it must occur exactly once) in one file of the working
tree, runs its tests with the project's python under a timeout, and restores the file byte for
byte, with its timestamps (also on Ctrl-C or SIGTERM). Verdicts:

- ``caught``: a test failed on the mutation, and every test passed on the restored tree;
- ``MISSED``: every test passed on the mutation;
- ``ANCHOR``: the text is not in the file exactly once (the code moved: fix the entry);
- ``SKIPPED``: the tests skipped themselves here (e.g. no hosts testbed): nothing was shown;
- ``REVERT FAILS``: the tests also fail without the mutation (the failure shows nothing);
- ``TIMEOUT``: the run did not finish in time.

Exit status 0 only when every selected mutation was caught (SKIPPED too, unless ``--strict``).

The working tree is shared: the script holds ``/tmp/hvd-heavy.lock`` (the suite's CPU lock, see
STYLE/brief) from applying a mutation until the file is restored, so no test run that takes the
lock sees a broken product. Do not wrap it in ``flock`` yourself (it would wait on itself); pass
``--lock ''`` if you hold the lock already. If someone edited the mutated file meanwhile, only
the mutation is undone, and their edit is kept.

Not a test module: pytest collects ``test_*.py`` only.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str            # relative to the repository
    old: str             # exact text, found exactly once
    new: str
    tests: tuple[str, ...]  # pytest node ids; at least one must fail on the mutation
    why: str = ""        # the promise the tests make
    timeout: float = 1800.0


MUTATIONS: list[Mutation] = [
    # --- stable anchors -----------------------------------------------------------------------------
    Mutation(
        "bf16_ignored", "hvd_trainer/precision.py",
        '        if self.name == "fp32":\n            return contextlib.nullcontext()',
        '        if self.name in ("fp32", "bf16"):\n            return contextlib.nullcontext()',
        ("tests/parallel/test_workloads.py::test_bf16_autocast_reaches_the_digits_target",),
        "optim.precision=bf16 runs the forward pass in bf16, not silently in fp32"),
    Mutation(
        "ps_mode_forced_sync", "hvd_trainer/strategies/ps/rules.py",
        '    if mode == "sync":\n        return SyncRule(workers, start_step, backup_workers)',
        '    if mode in ("sync", "async", "ssp"):\n        return SyncRule(workers, start_step, backup_workers)',
        ("tests/parallel/test_ps.py::test_async_and_ssp_converge[async-3-0]",
         "tests/parallel/test_ps.py::test_async_and_ssp_converge[ssp-3-2]"),
        "ps.mode=async/ssp really run asynchronously (the servers measure staleness > 0)"),
    Mutation(
        "bench_mpi_no_reduce", "benchmarks/collectives.py",
        "return (lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)), buf",
        "return (lambda: None), buf",
        ("tests/parallel/test_bench_jobs.py::test_every_exchange_path_reports_every_size[mpi-2]",),
        "a bench path's timed op really reduces (its result in closed form), not only takes time"),
    Mutation(
        "bench_gloo_barrier_only", "benchmarks/collectives.py",
        "return (lambda: dist.all_reduce(t)), t",
        "return (lambda: dist.barrier()), t",
        ("tests/parallel/test_bench_jobs.py::test_every_exchange_path_reports_every_size[torch-gloo-2]",),
        "as above: a path that synchronises but does not reduce"),
    Mutation(
        "load_config_no_builtin_names", "hvd_trainer/config/loading.py",
        "            p = builtin  # a name, as ``hvd-train digits`` takes it; a file of that name wins",
        "            pass  # mutation: built-in names not resolved",
        ("tests/unit/test_config.py::test_load_config_takes_a_builtin_name_as_hvd_train_does",),
        'load_config("digits") loads the built-in config, as hvd-train digits does'),
    Mutation(
        "builtin_configs_dir_empty", "hvd_trainer/config/loading.py",
        'BUILTIN = Path(__file__).resolve().parents[1] / "configs"',
        'BUILTIN = Path(__file__).resolve().parents[1] / "configz"',
        ("tests/unit/test_config.py::test_builtin_configs_load",),
        "the built-in configs loop has something to check"),
    Mutation(
        "testbed_ranks_on_one_host", "mpi_jobs/cli.py",
        "tb.on_host(tb.hosts[0], cmd)",
        "tb.on_host(tb.hosts[0], tb.mpirun_command(program, hosts=1, slots=np))",
        ("tests/integration/test_cross_host.py::test_hvd_launch_testbed_rehearses_a_multi_node_run",),
        "hvd-launch --testbed puts one rank on each host (it still prints -H node1:1,node2:1 here)"),
    Mutation(
        "container_runs_the_hosts_program", "mpi_jobs/containers.py",
        '            return cmd + [self.image, "--"] + list(program)',
        "            return list(program)",
        ("tests/integration/test_containers.py::test_mpirun_starts_one_container_per_rank",),
        "mpirun ... ch-run IMG -- hvd-train runs the image's hvd-train, not the host's"),
    Mutation(
        "one_rank_short_of_batches", "hvd_trainer/data/sharding.py",
        "        for b in range(skip, self.batches_in(offset)):",
        "        for b in range(skip, self.batches_in(offset) - (self.sampler.rank > 0)):",
        ("tests/unit/test_data.py::test_shards_of_two_ranks_interleave_to_one_rank_batches",),
        "every rank yields every batch (zip would stop at the shorter list)"),

    # --- anchors in code the lead is refactoring (trainer.py into trainer/runner/checkpointing/
    # reporting, and strategies/*): written against the tree of this change; expect to re-anchor ---
    Mutation(
        "adasum_is_average", "hvd_trainer/strategies/horovod.py",
        'op = hvd.Adasum if self.hcfg.op == "adasum" else hvd.Average',
        "op = hvd.Average",
        ("tests/parallel/test_invariants.py::test_adasum_keeps_replicas_equal_and_learns",),
        "horovod.op=adasum reduces with Adasum, not the average"),
    Mutation(
        "restore_noop", "hvd_trainer/checkpointing.py",
        '        if s.rank == 0 and resume == "auto":',
        "        if False:  # mutation: restore() finds nothing, silently",
        ("tests/parallel/test_invariants.py::test_resumed_run_is_bit_identical_to_uninterrupted[horovod]",
         "tests/parallel/test_ps.py::test_sync_ps_resume_is_bit_identical",
         "tests/parallel/test_workloads.py::test_resume_mid_epoch_with_workers_and_augmentation_is_bit_identical"),
        "a resumed run starts from the checkpoint (with the same seed a fresh start matches too)"),
    Mutation(
        "on_end_on_rank_0_only", "hvd_trainer/runner.py",
        "                if on_end is not None:\n                    on_end(trainer)",
        "                if on_end is not None and strategy.rank == 0:\n                    on_end(trainer)",
        ("tests/parallel/test_invariants.py::test_parameters_identical_on_every_rank[2]",
         "tests/parallel/test_preemption.py::test_a_signal_on_one_rank_stops_all_with_one_checkpoint_and_resume_is_exact[horovod]"),
        "every rank's weights are compared (train() calls on_end on every training rank)"),
    Mutation(
        "nonfinite_step_off_by_one", "hvd_trainer/trainer.py",
        "m.skipped_steps = self.guard.skip(err, st.step + 1, m.skipped_steps)",
        "m.skipped_steps = self.guard.skip(err, st.step, m.skipped_steps)",
        ("tests/parallel/test_failures.py::test_stop_ends_the_job_naming_the_step_and_keeps_the_good_checkpoint[horovod-2]",),
        "optim.nonfinite=stop names the step whose gradient was not finite"),
    Mutation(
        "ps_allreduce_returns_its_input", "hvd_trainer/strategies/ps/worker.py",
        "self._collective(self.workers_comm.Iallreduce(self.MPI.IN_PLACE, out.numpy(), op=self.MPI.SUM))",
        "self._collective(self.workers_comm.Ibarrier())",
        ("tests/parallel/test_collectives.py::test_small_collectives_in_closed_form[ps-3]",),
        "the PS workers' allreduce sums (with one worker, the identity passes every closed form)"),
    Mutation(
        "ps_waiter_never_times_out", "hvd_trainer/strategies/ps/wire.py",
        "            if silent > self.timeout:\n                self.fail(",
        "            if False:  # mutation: a silent peer is waited for forever\n                self.fail(",
        ("tests/parallel/test_ps.py::test_a_dead_or_stopped_peer_ends_the_job_with_its_name[1-19-worker 1 (rank 1)]",),
        "a stopped parameter-server peer is named by the waits' ps.timeout_s (the heartbeat is off there)"),
    Mutation(
        "heartbeat_disabled", "hvd_trainer/runtime/protocols.py",
        "        return self.silence(now) > self.timeout",
        "        return False  # mutation: a silent predecessor is never lost",
        ("tests/parallel/test_lost_rank.py::test_a_killed_rank_ends_the_job_naming_it[horovod]",
         "tests/parallel/test_lost_rank.py::test_a_stopped_rank_ends_the_job_naming_it[ddp]"),
        "a killed or stopped peer is named by the product's heartbeat (mpirun no longer ends the job)"),
    Mutation(
        "census_names_no_one", "hvd_trainer/runtime/protocols.py",
        "        return sorted(set(range(self.size)) - (self.answered or set(range(self.size))))",
        "        return []  # mutation: every peer seems to answer",
        ("tests/parallel/test_lost_rank.py::test_a_killed_rank_ends_the_job_naming_it[ddp]",),
        "a rank whose collective failed on a killed DDP peer names that peer"),
    Mutation(
        "straggler_never_named", "hvd_trainer/monitor/straggler.py",
        "            if v > factor * mid and v - mid >= min_excess_s:",
        "            if False:  # mutation: nobody is ever slow",
        ("tests/parallel/test_monitoring.py::test_a_rank_with_a_slow_data_path_is_named_and_a_balanced_run_names_none",),
        "a rank slowed on purpose is named as the straggler"),
    Mutation(
        "data_wait_not_marked", "hvd_trainer/monitor/monitor.py",
        '        self.phases.lap("data")',
        "        pass  # mutation: the data wait is charged to the next part",
        ("tests/parallel/test_monitoring.py::test_a_rank_with_a_slow_data_path_is_named_and_a_balanced_run_names_none",),
        "the data wait is measured as its own part"),
    Mutation(
        "tensorboard_keeps_rolled_back_steps", "hvd_trainer/monitor/tensorboard.py",
        "purge_step=resume_step + 1,",
        "purge_step=None,  # mutation",
        ("tests/unit/test_monitor_runs.py::test_tensorboard_scalars_at_their_steps_also_across_a_rolled_back_resume",),
        "a resumed run's TensorBoard log holds every step once, with the retrained values"),
    Mutation(
        "metrics_not_live", "hvd_trainer/monitor/prometheus.py",
        '        self._run("step", step)\n',
        "        pass  # mutation: the step gauge moves only at epoch ends\n",
        ("tests/parallel/test_monitoring.py::test_breakdown_adds_up_and_metrics_are_served_live",),
        "/metrics shows the run while it trains"),
    Mutation(
        "pipeline_loss_not_weighted", "hvd_trainer/parallel/executor.py",
        "loss_fn(out, y).float() * (len(y) / total_n)",
        "loss_fn(out, y).float()  # mutation: each microbatch's mean counts whole",
        ("tests/parallel/test_pipeline_parallel.py::test_p_stages_with_m_microbatches_train_like_one_process[transformer-2-gpipe-4-extra0]",),
        "m microbatches through P stages give the whole batch's gradient"),
    Mutation(
        "pipeline_norm_per_stage", "hvd_trainer/parallel/executor.py",
        "total = torch.tensor(float(squares[0])) ** 0.5",
        "total = local  # mutation: each stage clips by its own part of the norm",
        ("tests/parallel/test_pipeline_parallel.py::test_p_stages_with_m_microbatches_train_like_one_process[transformer-3-1f1b-4-extra1]",),
        "clipping and the NaN check under stages see the whole model's gradient norm"),
    Mutation(
        "pipeline_gradients_not_sent_back", "hvd_trainer/parallel/executor.py",
        "                        sends += self._send(g, self.stage - 1, i, grad=True)",
        "                        sends += self._send(torch.zeros_like(inp), self.stage - 1, i, grad=True)  # mutation",
        ("tests/parallel/test_pipeline_parallel.py::test_p_stages_with_m_microbatches_train_like_one_process[resnet-2-1f1b-2-extra2]",),
        "every stage trains: the gradient of each activation flows back to the stage before"),
    Mutation(
        "local_sgd_never_averages", "hvd_trainer/strategies/local_sgd.py",
        "            self.average()",
        "            pass  # mutation: the ranks never average",
        ("tests/parallel/test_local_sgd.py::test_ranks_agree_after_each_averaging_and_a_mid_round_stop_resumes_exactly[average]",),
        "local SGD's ranks agree right after each averaging"),
    Mutation(
        "local_sgd_resume_takes_rank_0s_state", "hvd_trainer/strategies/local_sgd.py",
        "        self.own_state = True",
        "        self.own_state = False  # mutation: rank 0's state is broadcast over the others' own",
        ("tests/parallel/test_local_sgd.py::test_ranks_agree_after_each_averaging_and_a_mid_round_stop_resumes_exactly[nesterov]",),
        "a mid-round resume continues each rank from its own state"),
    Mutation(
        "fedavg_unweighted_mean", "hvd_trainer/strategies/fedavg/strategy.py",
        "        self.total += n * self._flat()\n        self.weight += n",
        "        self.total += self._flat()\n        self.weight += 1  # mutation: every client counts the same",
        ("tests/parallel/test_fedavg.py::test_a_round_of_full_batch_clients_is_one_gradient_step_on_the_whole_set",),
        "the round's mean is weighted by the clients' sample counts"),
    Mutation(
        "fedavg_resume_drops_partial_sums", "hvd_trainer/strategies/fedavg/strategy.py",
        "            self.total, self.weight = own[\"total\"].clone(), float(own[\"weight\"])",
        "            pass  # mutation: the clients trained before the stop are forgotten",
        ("tests/parallel/test_fedavg.py::test_a_stop_between_two_clients_of_a_round_resumes_exactly",),
        "a stop between two clients of a round resumes exactly"),
    # --- hvd-tune ----------------------------------------------------------------------------------
    Mutation(
        "tune_groups_share_horovod_world", "hvd_trainer/strategies/horovod.py",
        "        group = run_world.comm() if run_world.scope() is not None else None\n",
        "        group = None\n",
        ("tests/parallel/test_tune.py::test_two_groups_train_at_the_same_time_and_their_collectives_never_mix[horovod]",),
        "each group's Horovod runs on its own communicator, not the job's"),
    Mutation(
        "tune_prune_on_rank0_only", "hvd_trainer/tune/trials.py",
        "        verdict = strategy.broadcast_object(verdict)\n",
        "",
        ("tests/parallel/test_tune.py::test_an_asha_pruned_trial_stops_on_every_rank_of_its_group_at_one_step",),
        "a pruned trial stops on every rank of its group, at one step"),
    Mutation(
        "tune_interrupted_trials_forgotten", "hvd_trainer/tune/packed.py",
        "        leftover = [t.number for t in storage.interrupted(study)]\n",
        "        leftover = []\n",
        ("tests/parallel/test_tune.py::test_a_stopped_study_resumes_its_running_trials_and_reruns_no_finished_one",),
        "a requeued study resumes the trials a stop left running"),
    Mutation(
        "tune_grid_random_per_group", "hvd_trainer/tune/storage.py",
        "        return _Grid(cfg.grid_space(), seed=cfg.seed)",
        "        return _Grid(cfg.grid_space(), seed=cfg.seed + stream)",
        ("tests/unit/test_tune_rules.py::test_two_leaders_sharing_a_journal_walk_the_grid_once_and_stop_at_the_count",
         "tests/parallel/test_tune.py::test_a_2x2_grid_on_two_groups_runs_every_point_once_and_the_best_reproduces"),
        "groups sharing a grid walk each point once"),
]


# --- applying and restoring ----------------------------------------------------------------------
class AnchorError(Exception):
    pass


def anchor_count(m: Mutation) -> int:
    path = REPO / m.file
    return path.read_bytes().count(m.old.encode()) if path.is_file() else -1


@contextmanager
def applied(m: Mutation) -> Iterator[None]:
    """The file with ``m`` applied, for the duration; then restored (byte for byte and with its
    timestamps, unless someone edited it meanwhile: then only the mutation is undone)."""
    path = REPO / m.file
    if not path.is_file():
        raise AnchorError(f"{m.file}: no such file")
    original = path.read_bytes()
    old, new = m.old.encode(), m.new.encode()
    found = original.count(old)
    if found != 1:
        raise AnchorError(f"{m.file}: the text to replace is there {found} times, not once")
    stat = path.stat()
    mutated = original.replace(old, new)
    path.write_bytes(mutated)
    try:
        yield
    finally:
        now = path.read_bytes()
        if now == mutated:
            path.write_bytes(original)
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        elif now.count(new) == 1:
            path.write_bytes(now.replace(new, old))
            print(f"  note: {m.file} was edited during the run; undid the mutation, kept the edit", flush=True)
        else:
            print(f"  !!! {m.file} changed during the run and the mutation text is not in it once: "
                  f"restore by hand (replace {m.new!r} with {m.old!r})", flush=True)
            raise SystemExit(3)


@contextmanager
def heavy_lock(path: str) -> Iterator[None]:
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- running the tests -----------------------------------------------------------------------------
@dataclass
class Run:
    outcomes: dict[str, str]  # test case -> passed / failed / skipped
    messages: dict[str, str]  # failed test case -> the first line of why
    returncode: Optional[int]  # None: timed out
    seconds: float
    tail: str

    @property
    def failed(self) -> list[str]:
        return [k for k, v in self.outcomes.items() if v == "failed"]

    @property
    def all_skipped(self) -> bool:
        return bool(self.outcomes) and all(v == "skipped" for v in self.outcomes.values())


def run_tests(tests: tuple[str, ...], timeout: float) -> Run:
    python = str(PYTHON if PYTHON.exists() else Path(sys.executable))
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
               f"--junitxml={junit}", *tests]
        # no .pyc of a mutated module may outlive the mutation
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
            code: Optional[int] = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            code = None
        except BaseException:  # Ctrl-C: the whole pytest process group goes too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        seconds = time.monotonic() - t0
        outcomes, messages = _outcomes(junit) if junit.exists() else ({}, {})
    return Run(outcomes, messages, code, seconds, out[-2500:])


def _outcomes(junit: Path) -> tuple[dict[str, str], dict[str, str]]:
    out, why = {}, {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            out[name] = "failed"
            why[name] = (bad.get("message") or "").strip().splitlines()[0][:200] if bad.get("message") else ""
        elif case.find("skipped") is not None:
            out[name] = "skipped"
        else:
            out[name] = "passed"
    return out, why


def check(m: Mutation, revert_check: bool, lock: str) -> tuple[str, str]:
    """(verdict, detail)."""
    with heavy_lock(lock):
        t0 = time.monotonic()
        try:
            with applied(m):
                broken = run_tests(m.tests, m.timeout)
        except AnchorError as err:
            return "ANCHOR", str(err)
        if broken.returncode is None:
            return "TIMEOUT", f"after {broken.seconds:.0f} s\n{broken.tail}"
        if broken.returncode in (4, 5) or not broken.outcomes:  # usage error, nothing collected
            return "NOT RUN", f"pytest exited {broken.returncode}: a test id is wrong?\n{broken.tail}"
        if broken.all_skipped:
            return "SKIPPED", broken.tail.strip().splitlines()[-1]
        if not broken.failed:
            return "MISSED", f"{len(broken.outcomes)} passed on the mutation in {broken.seconds:.0f} s"
        detail = f"failed on the mutation ({broken.seconds:.0f} s):" + "".join(
            f"\n    {name}\n      {broken.messages.get(name, '')}" for name in broken.failed) + "\n "
        if revert_check:
            clean = run_tests(m.tests, m.timeout)
            if clean.returncode != 0 or clean.failed:
                return "REVERT FAILS", f"{detail}; but also without it:\n{clean.tail}"
            detail += f"; passed once restored ({clean.seconds:.0f} s)"
        return "caught", f"{detail}; {time.monotonic() - t0:.0f} s in all"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="list the mutations and whether each anchor is found")
    p.add_argument("--only", action="append", metavar="NAME", help="run only this mutation (repeatable)")
    p.add_argument("--no-revert-check", action="store_true", help="do not rerun the tests on the restored tree")
    p.add_argument("--strict", action="store_true", help="a SKIPPED mutation fails the run too")
    p.add_argument("--lock", default="/tmp/hvd-heavy.lock", help="lock held while a mutation is applied ('' for none)")
    args = p.parse_args(argv)
    names = [m.name for m in MUTATIONS]
    assert len(set(names)) == len(names), "mutation names must be unique"
    chosen = MUTATIONS
    if args.only:
        unknown = [n for n in args.only if n not in names]
        if unknown:
            p.error(f"unknown mutation(s) {', '.join(unknown)}; known: {', '.join(names)}")
        chosen = [m for m in MUTATIONS if m.name in args.only]
    if args.list:
        for m in chosen:
            n = anchor_count(m)
            state = "anchor ok" if n == 1 else "no such file" if n < 0 else f"ANCHOR found {n} times"
            print(f"{m.name:34} {m.file:40} {state}\n    {m.why}\n    " + "\n    ".join(m.tests))
        return 0 if all(anchor_count(m) == 1 for m in chosen) else 1

    def stop(signum, frame):  # SIGTERM/SIGHUP: unwind, so the file is restored
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    results = []
    for m in chosen:
        print(f"{m.name}: {m.file}", flush=True)
        t0 = time.monotonic()
        verdict, detail = check(m, not args.no_revert_check, args.lock)
        print(f"  {verdict}: {detail}", flush=True)
        results.append((m.name, verdict, time.monotonic() - t0))
    print("\nsummary (wall time includes waiting for the lock):")
    for name, verdict, seconds in results:
        print(f"  {verdict:12} {seconds:6.0f} s  {name}")
    ok = {"caught"} | (set() if args.strict else {"SKIPPED"})
    return 0 if all(v in ok for _, v, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
