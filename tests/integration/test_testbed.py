"""The hosts testbed: names, addresses, resolution, ssh, isolation, bandwidth caps, and
teardown after success, failure, Ctrl-C, SIGTERM and a killed owner."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from hosts import SKIP_REASON, run_on, start_testbed, testbed  # noqa: F401 - the fixture
from mpi_jobs import netns
from mpi_jobs.testbed import CLAIMS, IFACE, Testbed, reap_stale

pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=f"hosts testbed: {SKIP_REASON}")


def _gone(tb_index: int, tmp: Path) -> list[str]:
    """What a stopped testbed left behind (empty when nothing)."""
    left = [n for n in netns.list_names() if n.startswith(f"hvdtb{tb_index}-")]
    left += [str(p) for p in Path("/etc/netns").glob(f"hvdtb{tb_index}-*")]
    left += [str(p) for p in (tmp, CLAIMS / str(tb_index)) if p.exists()]
    return left


def test_every_host_has_its_name_address_and_resolves_the_others(testbed):
    for h in testbed.hosts:
        assert run_on(testbed, h, ["hostname"]).stdout.strip() == h.name
        addrs = run_on(testbed, h, ["ip", "-o", "-4", "addr", "show", "dev", IFACE]).stdout
        assert f"inet {h.address}/24" in addrs
        for other in testbed.hosts:
            assert run_on(testbed, h, ["getent", "hosts", other.name]).stdout.split()[0] == other.address
    assert testbed.subnet.startswith("198.18.") or testbed.subnet.startswith("198.19.")


def test_ssh_with_the_testbeds_key_only(testbed):
    first, last = testbed.hosts[0], testbed.hosts[-1]
    res = run_on(testbed, last, ["ssh", first.name, "hostname"])  # the /etc/ssh of every host
    assert res.returncode == 0 and res.stdout.strip() == first.name, res.output
    refused = run_on(testbed, first, ["ssh", "-o", "PubkeyAuthentication=no", last.name, "true"])
    assert refused.returncode != 0  # no password, no keyboard-interactive: the key or nothing
    # with the client config named explicitly (what a caller outside the hosts' /etc/ssh uses)
    res = run_on(testbed, first, testbed.ssh_command(last, ["echo", "a b"]))
    assert res.stdout == "a b\n", res.output


def test_bandwidth_cap_is_measured_on_the_link(testbed):
    a, b = testbed.hosts[:2]
    free = testbed.measure_mbit(a, b, nbytes=16 << 20)
    testbed.limit_bandwidth(b, 50)
    try:
        capped_in, capped_out = testbed.measure_mbit(a, b), testbed.measure_mbit(b, a)
    finally:
        testbed.limit_bandwidth(b, None)
    print(f"uncapped {free:.0f} Mbit/s, capped at 50: in {capped_in:.1f}, out {capped_out:.1f} Mbit/s")
    # tbf holds the rate closely (49 Mbit/s measured here); loose bounds for a busy machine
    for rate in (capped_in, capped_out):
        assert 25 <= rate <= 75, (free, capped_in, capped_out)
    assert free > 4 * 50, free


def test_two_testbeds_get_their_own_names_and_subnets_and_cannot_reach_each_other(testbed):
    with Testbed(hosts_count=2) as other:
        assert other.index != testbed.index and other.subnet != testbed.subnet
        assert not set(h.netns for h in other.hosts) & set(h.netns for h in testbed.hosts)
        res = run_on(other, other.hosts[0], ["ssh", "-o", "ConnectTimeout=2", testbed.hosts[1].address, "true"])
        assert res.returncode != 0
        index, tmp = other.index, other.tmp
    assert _gone(index, tmp) == []
    assert run_on(testbed, testbed.hosts[0], ["ssh", "node2", "true"]).returncode == 0  # untouched


def test_stop_removes_processes_namespaces_files_and_keys_after_a_failure():
    with pytest.raises(RuntimeError, match="boom"):
        with start_testbed(2) as tb:
            index, tmp = tb.index, tb.tmp
            sleeper = subprocess.Popen(tb.on_host(tb.hosts[0], tb.ssh_command(tb.hosts[1], ["sleep", "600"])),
                                       start_new_session=True)
            # a detached process on a host (it left its ssh session) must die too
            subprocess.Popen(tb.on_host(tb.hosts[1], ["setsid", "sleep", "600"]), start_new_session=True)
            time.sleep(0.5)
            raise RuntimeError("boom")
    assert _gone(index, tmp) == []
    assert sleeper.wait(10) is not None
    assert tb.index == -1 and tb.tmp is None


# A shell runs background jobs with SIGINT ignored, and Python then keeps it ignored: restore
# Python's Ctrl-C handler, as an interactive terminal would have it, so SIGINT means Ctrl-C.
CHILD = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, sys.argv[1])
from mpi_jobs.testbed import Testbed
with Testbed(hosts_count=2) as tb:
    print(tb.index, tb.tmp, flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_teardown_on_ctrl_c_sigterm_and_after_a_killed_owner(how):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(REPO)], stdout=subprocess.PIPE, text=True,
                             stderr=subprocess.DEVNULL,
                             start_new_session=True)
    index, tmp = child.stdout.readline().split()
    os.kill(child.pid, getattr(signal, how))
    child.wait(30)
    if how == "SIGKILL":  # nothing ran in the owner: the next start (or reap_stale) cleans up
        assert [n for n in netns.list_names() if n.startswith(f"hvdtb{index}-")]
        assert int(index) in reap_stale()
    assert _gone(int(index), Path(tmp)) == []
