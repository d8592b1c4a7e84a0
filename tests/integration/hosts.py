"""Helpers for tests on the hosts testbed (``mpi_jobs.testbed``): start one that the per-test
process guard of ``tests/conftest.py`` does not mistake for a leftover, and run commands on it.

The testbed's sshd outlives single tests, so it starts with this test's tag removed from its
environment (the session tag stays: if a teardown ever failed, the session-end reaper would still
find it). Ranks started through it are tagged again by ``mpirun -x`` / horovodrun's forwarding,
so a rank left behind on any host still fails the test that started it.
"""
from __future__ import annotations

import os
from typing import Sequence

import pytest

from conftest import TEST_VAR, Result, run_cmd
from mpi_jobs.testbed import Host, Testbed, unavailable_reason

SKIP_REASON = unavailable_reason()  # None where network namespaces, root and sshd are there


def start_testbed(hosts: int, **kwargs) -> Testbed:
    env = {k: v for k, v in os.environ.items() if k != TEST_VAR}
    return Testbed(hosts_count=hosts, daemon_env=env, **kwargs).start()


def run_on(tb: Testbed, host: Host, cmd: Sequence[str], timeout: float = 180) -> Result:
    """``cmd`` on ``host`` under conftest's hard timeout (the whole process group is killed)."""
    return run_cmd(tb.on_host(host, cmd), timeout=timeout)


@pytest.fixture(scope="module")
def testbed():
    """A 3-host testbed for the tests of one module (import this name to use it)."""
    tb = start_testbed(3)
    try:
        yield tb
    finally:
        tb.stop()
