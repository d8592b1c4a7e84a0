"""A hosts testbed: N "hosts" on this machine, from network namespaces on a private bridge.

Each host has its own network namespace with one interface named ``eth0`` (the same name on
every host, as ``horovodrun --network-interfaces`` wants) holding an address of the testbed's own
/24 inside 198.18.0.0/15 (the benchmarking range: no traffic leaves the machine); its own hostname
(a UTS namespace); its own ``/etc/hosts`` naming every host; its own ``/etc/ssh`` holding an ssh
client config with the testbed's key and known_hosts; and a real ``sshd`` with key-only root
login. So from inside any host, ``ssh node2 CMD``, ``mpirun -H node1:1,node2:1 ...`` and
``horovodrun -H node1:1,node2:1 --network-interfaces eth0 ...`` work as on a small cluster. All
hosts share this machine's file system, so the venv (``sys.executable``) works on every host.

    with Testbed(3) as tb:
        tb.run(tb.hosts[0], ["ssh", "node2", "hostname"])       # stdout "node2"
        subprocess.run(tb.on_host(tb.hosts[0], tb.mpirun_command([sys.executable, "train.py"])))

Contracts:
- ``start()`` returns a running testbed or, having failed, has removed everything it made.
- ``stop()`` is idempotent and removes every process running inside the hosts, the namespaces
  (and with them the bridge, the veths and any ``tc`` caps), ``/etc/netns/<ns>/``, the temp dir
  with the keys and the testbed's claim. It runs at ``with`` exit, at interpreter exit (atexit),
  and on SIGTERM/SIGHUP (turned into SystemExit while a testbed runs); Ctrl-C unwinds ``with``.
- Two testbeds never collide: each claims a free index ``i`` (a file created exclusively under
  ``/run/hvd-testbed``), which fixes its namespace names ``hvdtb<i>-*`` and its subnet, the i-th
  /24 of 198.18.0.0/15. Claims whose owner process is gone are reaped first (a SIGKILLed run).
- Needs root, ``ip netns``, ``unshare``, ``sshd``: :func:`unavailable_reason` says what is missing.
"""
from __future__ import annotations

import atexit
import ipaddress
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from . import commands, netns

IFACE = "eth0"
NETWORK = ipaddress.ip_network("198.18.0.0/15")
MAX_TESTBEDS = 2 ** (24 - NETWORK.prefixlen)  # one /24 each
CLAIMS = Path("/run/hvd-testbed")
SSHD = "/usr/sbin/sshd"


@dataclass(frozen=True, slots=True)
class Host:
    """One host of a testbed: ``name`` is its hostname (resolvable from every host), ``netns`` its
    network namespace, ``address`` its address on ``eth0``, ``port`` its sshd port."""

    name: str
    netns: str
    address: str
    port: int = 22


@dataclass(kw_only=True, slots=True)
class Testbed:
    """``hosts_count`` hosts named ``<hostname_prefix>1..N``; ``rate_mbit``: an optional per-host
    bandwidth cap (both directions, ``tc tbf``); ``daemon_env``: the environment sshd runs with
    (default: this process's), so a caller can keep its own tags off the long-lived daemon."""

    __test__ = False  # not a pytest test class, despite its name
    hosts_count: int = 2
    rate_mbit: Optional[float] = None
    hostname_prefix: str = "node"
    daemon_env: Optional[dict[str, str]] = None
    start_timeout: float = 30.0
    index: int = field(default=-1, init=False)  # the claimed index while running, else -1
    net_index: int = field(default=-1, init=False)  # the index names and subnet come from
    hosts: list[Host] = field(default_factory=list, init=False)
    tmp: Optional[Path] = field(default=None, init=False)
    _sshd: list[subprocess.Popen] = field(default_factory=list, init=False)
    _old_handlers: dict = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.hosts_count <= 250:
            raise ValueError(f"hosts_count must be 1..250, got {self.hosts_count}")

    # --- names ---------------------------------------------------------------------------
    @property
    def prefix(self) -> str:
        return f"hvdtb{self.net_index}-"

    @property
    def subnet(self) -> str:
        return str(_subnet(self.net_index))

    @property
    def bridge_ns(self) -> str:
        return self.prefix + "br"

    @property
    def ssh_config(self) -> Path:
        """The ssh client config (key, known_hosts). Inside a host it is also ``/etc/ssh/ssh_config``;
        ``ssh -F`` it from a process that joined only a host's network namespace."""
        assert self.tmp is not None
        return self.tmp / "ssh" / "ssh_config"

    def host_slots(self, count: Optional[int] = None, slots: int = 1) -> dict[str, int]:
        """``{hostname: slots}`` of the first ``count`` hosts (all by default), for ``-H``."""
        return {h.name: slots for h in self.hosts[:count or len(self.hosts)]}

    def layout(self, index: int) -> list[Host]:
        """Name the hosts and addresses of testbed ``index`` without creating anything (what
        ``start()`` does after claiming an index; ``hvd-launch --dry-run`` shows it)."""
        self.net_index = index
        addrs = _subnet(index).hosts()
        self.hosts = [Host(f"{self.hostname_prefix}{i + 1}", f"hvdtb{index}-n{i + 1}", str(next(addrs)))
                      for i in range(self.hosts_count)]
        return self.hosts

    # --- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> "Testbed":
        return self if self.index >= 0 else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "Testbed":
        if self.index >= 0:
            raise RuntimeError(f"testbed {self.index} is already running")
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(f"testbed unavailable: {reason}")
        reap_stale()
        self.index = _claim()
        atexit.register(self.stop)
        self._trap_signals()
        try:
            self._build()
        except BaseException:
            self.stop()
            raise
        return self

    def _build(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"hvd-testbed{self.index}-"))
        (CLAIMS / str(self.index)).write_text(f"{os.getpid()}\n{self.tmp}\n")  # for reap_stale
        self.layout(self.index)
        net = _subnet(self.index)
        netns.add(self.bridge_ns)
        _ipv4_only(self.bridge_ns)
        netns.ip(self.bridge_ns, "link", "add", "br0", "type", "bridge")
        netns.ip(self.bridge_ns, "link", "set", "br0", "up")
        for i, h in enumerate(self.hosts):
            netns.add(h.netns)
            _ipv4_only(h.netns)
            # create the pair in the bridge's namespace with the host end already named eth0
            # inside the host's namespace: no name ever appears in this machine's namespace
            netns.ip(self.bridge_ns, "link", "add", f"h{i + 1}", "type", "veth", "peer", "name", IFACE,
                     "netns", h.netns)
            netns.ip(self.bridge_ns, "link", "set", f"h{i + 1}", "master", "br0", "up")
            netns.ip(h.netns, "link", "set", "lo", "up")
            netns.ip(h.netns, "addr", "add", f"{h.address}/{net.prefixlen}", "dev", IFACE)
            netns.ip(h.netns, "link", "set", IFACE, "up")
        _write_ssh_files(self.tmp, self.hosts)
        for h in self.hosts:
            _write_etc(h, self.hosts, self.tmp)
        if self.rate_mbit:
            for h in self.hosts:
                self.limit_bandwidth(h, self.rate_mbit)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        for h in self.hosts:
            self._start_sshd(h)
        self._wait_for_ssh()

    def _start_sshd(self, h: Host) -> None:
        assert self.tmp is not None
        log = open(self.tmp / f"sshd-{h.name}.log", "wb")
        cmd = self.on_host(h, [SSHD, "-D", "-e", "-f", str(self.tmp / "ssh" / f"sshd_config.{h.name}")])
        env = dict(os.environ if self.daemon_env is None else self.daemon_env)
        self._sshd.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           stdin=subprocess.DEVNULL, start_new_session=True))
        log.close()

    def _wait_for_ssh(self) -> None:
        """Until every host answers ``ssh HOST hostname`` from the first host with its name."""
        deadline = time.monotonic() + self.start_timeout
        pending = list(self.hosts)
        while pending:
            h = pending[0]
            res = self.run(self.hosts[0], ["ssh", h.name, "hostname"], timeout=15, check=False)
            if res.returncode == 0 and res.stdout.strip() == h.name:
                pending.pop(0)
                continue
            dead = [p for p in self._sshd if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"sshd on {h.name} not reachable: {res.stderr.strip()}\n{self.logs()}")
            time.sleep(0.2)

    def logs(self) -> str:
        if not self.tmp:
            return ""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                         for p in sorted(self.tmp.glob("sshd-*.log")))

    def stop(self) -> None:
        """Remove everything the testbed made (idempotent; safe after a partial start)."""
        if self.index < 0:
            return
        index, self.index = self.index, -1
        names = [f"hvdtb{index}-n{i + 1}" for i in range(self.hosts_count)] + [f"hvdtb{index}-br"]
        _teardown(names)
        for p in self._sshd:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        self._sshd.clear()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        (CLAIMS / str(index)).unlink(missing_ok=True)
        atexit.unregister(self.stop)
        self._restore_signals()

    def _trap_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) == signal.SIG_DFL:
                self._old_handlers[sig] = signal.signal(sig, _exit_on_signal)

    def _restore_signals(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()

    # --- running things on hosts ---------------------------------------------------------
    def on_host(self, host: Host, cmd: Sequence[str]) -> list[str]:
        """The argument list that runs ``cmd`` on ``host``: in its network namespace (whose
        ``ip netns exec`` binds ``/etc/netns/<ns>/{hosts,ssh}`` over ``/etc``) and a UTS
        namespace carrying its hostname. No ssh involved; the caller's environment is kept."""
        return ["ip", "netns", "exec", host.netns, "unshare", "--uts", "--", "sh", "-c",
                'hostname "$0" && exec "$@"', host.name, *cmd]

    def ssh_command(self, host: Host, cmd: Sequence[str]) -> list[str]:
        """``ssh`` to ``host`` with the testbed's config, for use from inside any host."""
        return ["ssh", "-F", str(self.ssh_config), host.name, shlex.join(list(cmd))]

    def run(self, host: Host, cmd: Sequence[str], timeout: float = 60, check: bool = True,
            env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
        """Run ``cmd`` on ``host`` and wait (hard ``timeout``; ``check``: raise on non-zero exit)."""
        return subprocess.run(self.on_host(host, cmd), capture_output=True, text=True, timeout=timeout,
                              check=check, env=env)

    def limit_bandwidth(self, host: Host, rate_mbit: Optional[float]) -> None:
        """Cap ``host``'s link at ``rate_mbit`` Mbit/s in both directions (``tc tbf`` on its eth0
        and on the bridge's end of its veth); ``None`` removes the cap."""
        port = f"h{self.hosts.index(host) + 1}"
        for ns, dev in ((host.netns, IFACE), (self.bridge_ns, port)):
            if rate_mbit is None:
                netns.run(ns, ["tc", "qdisc", "del", "dev", dev, "root"], check=False)
                continue
            # a bucket of ~20 ms at the rate (at least 64 KiB) keeps the kernel's timer
            # granularity from lowering the rate; a 100 ms queue bounds the added delay
            burst = max(64 * 1024, int(rate_mbit * 1e6 / 8 * 0.02))
            netns.run(ns, ["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_mbit}mbit",
                           "burst", str(burst), "latency", "100ms"])

    def measure_mbit(self, src: Host, dst: Host, nbytes: int = 4 << 20, port: int = 5201,
                     timeout: float = 60) -> float:
        """Send ``nbytes`` over TCP from ``src`` to ``dst``; the receiver's rate in Mbit/s, timed
        from the first byte received to the sender's close (one flow, plain sockets)."""
        recv = subprocess.Popen(self.on_host(dst, [sys.executable, "-c", _RECEIVER, dst.address, str(port)]),
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            assert recv.stdout is not None
            if recv.stdout.readline().strip() != "ready":
                raise RuntimeError("the receiver did not start")
            self.run(src, [sys.executable, "-c", _SENDER, dst.address, str(port), str(nbytes)], timeout=timeout)
            got, seconds = recv.communicate(timeout=timeout)[0].split()
        finally:
            if recv.poll() is None:
                recv.kill()
                recv.wait()
        if int(got) != nbytes:
            raise RuntimeError(f"received {got} of {nbytes} bytes")
        return nbytes * 8 / float(seconds) / 1e6

    # --- launch commands -----------------------------------------------------------------
    def mpirun_command(self, program: Sequence[str], *, hosts: Optional[int] = None, slots: int = 1,
                       **kwargs) -> list[str]:
        """``mpirun`` over the first ``hosts`` hosts with ``slots`` ranks each (run it on host 1):
        ``-H``, MPI and its out-of-band channel kept on the testbed's subnet, the environment
        ranks need forwarded with ``-x``, and no core binding (every host's "cores" are the same
        physical cores: binding would stack each host's first rank on core 0)."""
        spec = self.host_slots(hosts, slots)
        kwargs.setdefault("bind_to", "none")
        return commands.mpirun_command(sum(spec.values()), program, hosts=spec, tcp_subnet=self.subnet,
                                       **kwargs)

    def horovodrun_command(self, program: Sequence[str], *, hosts: Optional[int] = None, slots: int = 1,
                           **kwargs) -> list[str]:
        """``horovodrun --gloo`` over the first ``hosts`` hosts (run it on host 1)."""
        spec = self.host_slots(hosts, slots)
        kwargs.setdefault("gloo", True)
        return commands.horovodrun_command(sum(spec.values()), program, hosts=spec,
                                           network_interfaces=[IFACE], **kwargs)


# One-flow throughput probe: the receiver prints "ready", then "<bytes> <seconds>" at EOF.
_RECEIVER = """import socket, sys, time
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
conn, _ = srv.accept()
buf = bytearray(1 << 20)
total = conn.recv_into(buf)
start = time.perf_counter()
while True:
    n = conn.recv_into(buf)
    if not n:
        break
    total += n
print(total, max(time.perf_counter() - start, 1e-9))
"""
_SENDER = """import socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])))
sock.sendall(bytes(int(sys.argv[3])))
sock.close()
"""


def _ipv4_only(ns: str) -> None:
    """No IPv6 (not even link-local chatter): the testbed speaks its 198.18 subnet only."""
    for key in ("all", "default"):
        netns.run(ns, ["sysctl", "-q", "-w", f"net.ipv6.conf.{key}.disable_ipv6=1"])


def _exit_on_signal(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def _subnet(index: int) -> ipaddress.IPv4Network:
    return ipaddress.ip_network((int(NETWORK.network_address) + 256 * index, 24))


def unavailable_reason() -> Optional[str]:
    """Why a testbed cannot start here (None when it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, sshd)"
    for tool in ("ip", "unshare", "ssh", "ssh-keygen", "tc", "hostname"):
        if not shutil.which(tool):
            return f"{tool} not found (apt-get install iproute2 openssh-client util-linux)"
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} not found (apt-get install openssh-server)"
    probe = f"hvdtb-probe{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"cannot create network namespaces: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _claim() -> int:
    """Claim the lowest free testbed index: no claim file, no namespace with its prefix, and no
    address of this machine's namespace inside its subnet."""
    CLAIMS.mkdir(parents=True, exist_ok=True)
    existing = set(netns.list_names())
    local = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
    for index in range(MAX_TESTBEDS):
        if any(n.startswith(f"hvdtb{index}-") for n in existing):
            continue
        net = _subnet(index)
        if any(ipaddress.ip_address(w.split("/")[0]) in net for w in local.split() if w.count(".") == 3 and "/" in w):
            continue
        try:
            fd = os.open(CLAIMS / str(index), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return index
    raise RuntimeError("no free testbed index (198.18.0.0/15 is used up)")


def reap_stale() -> list[int]:
    """Tear down testbeds whose owning process is gone (claim file of a dead pid, or namespaces
    without a claim): their processes, namespaces, /etc/netns files and key dir. Returns the
    indices removed."""
    CLAIMS.mkdir(parents=True, exist_ok=True)
    names = netns.list_names()
    by_index: dict[int, list[str]] = {}
    for n in names:
        head = n.split("-", 1)[0]
        if head.startswith("hvdtb") and head[5:].isdigit():
            by_index.setdefault(int(head[5:]), []).append(n)
    for claim in CLAIMS.iterdir():
        if claim.name.isdigit():
            by_index.setdefault(int(claim.name), [])
    reaped = []
    for index, ns_names in sorted(by_index.items()):
        claim = CLAIMS / str(index)
        try:
            owner, *rest = claim.read_text().split("\n")
            owner_pid, tmp = int(owner or "0"), (rest[0] if rest else "")
        except (FileNotFoundError, ValueError):
            owner_pid, tmp = 0, ""
        if owner_pid and _alive(owner_pid):
            continue
        _teardown(ns_names + [f"hvdtb{index}-n{i}" for i in range(1, 251) if Path(f"/etc/netns/hvdtb{index}-n{i}").exists()])
        if tmp and Path(tmp).name.startswith(f"hvd-testbed{index}-"):
            shutil.rmtree(tmp, ignore_errors=True)
        claim.unlink(missing_ok=True)
        reaped.append(index)
    return reaped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _teardown(ns_names: Sequence[str]) -> None:
    """Kill every process inside these namespaces, then delete them and their /etc/netns files."""
    existing = set(netns.list_names())
    live = [n for n in ns_names if n in existing]
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
        pids = {p for n in live for p in netns.pids(n)}
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            pids = {p for p in pids if _alive(p) and not _zombie(p)}
            time.sleep(0.05)
    for n in live:
        subprocess.run(["ip", "netns", "del", n], capture_output=True)
    for n in ns_names:
        shutil.rmtree(Path("/etc/netns") / n, ignore_errors=True)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


def _write_ssh_files(tmp: Path, hosts: Sequence[Host]) -> None:
    """Keys made for this testbed: a client key (root's only way in), a host key per host, a
    known_hosts naming every host by name and address, the client config and each sshd_config."""
    ssh = tmp / "ssh"
    ssh.mkdir(mode=0o700)
    _keygen(ssh / "id_ed25519")
    (ssh / "authorized_keys").write_text((ssh / "id_ed25519.pub").read_text())
    known = []
    for h in hosts:
        _keygen(ssh / f"host_{h.name}")
        known.append(f"{h.name},{h.address} {(ssh / f'host_{h.name}.pub').read_text().split(' ')[0]} "
                     f"{(ssh / f'host_{h.name}.pub').read_text().split(' ')[1]}")
        (ssh / f"sshd_config.{h.name}").write_text("\n".join([
            f"ListenAddress {h.address}:{h.port}", f"HostKey {ssh / f'host_{h.name}'}",
            f"PidFile {tmp / f'sshd-{h.name}.pid'}", f"AuthorizedKeysFile {ssh / 'authorized_keys'}",
            "PermitRootLogin prohibit-password", "PubkeyAuthentication yes", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "UseDNS no",
            "MaxStartups 100:30:200", "MaxSessions 100", "LogLevel ERROR", "Subsystem sftp internal-sftp",
        ]) + "\n")
    (ssh / "known_hosts").write_text("\n".join(known) + "\n")
    (ssh / "ssh_config").write_text("\n".join([
        "Host *", "  User root", f"  IdentityFile {ssh / 'id_ed25519'}", "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {ssh / 'known_hosts'}", "  GlobalKnownHostsFile /dev/null",
        # the testbed's known_hosts names every host; only a name outside it (localhost) is new
        "  StrictHostKeyChecking accept-new", "  BatchMode yes", "  ConnectTimeout 10", "  LogLevel ERROR",
    ]) + "\n")


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "hvd-testbed", "-f", str(path)],
                   check=True, capture_output=True)


def _write_etc(host: Host, hosts: Sequence[Host], tmp: Path) -> None:
    """/etc/netns/<ns>/hosts (every host by name; the host's own name is NOT loopback, so Gloo and
    torch resolve it to eth0) and /etc/netns/<ns>/ssh/ssh_config (the testbed's client config)."""
    etc = Path("/etc/netns") / host.netns
    (etc / "ssh").mkdir(parents=True, exist_ok=True)
    lines = ["127.0.0.1 localhost"] + [f"{h.address} {h.name}" for h in hosts]
    (etc / "hosts").write_text("\n".join(lines) + "\n")
    shutil.copy(tmp / "ssh" / "ssh_config", etc / "ssh" / "ssh_config")
