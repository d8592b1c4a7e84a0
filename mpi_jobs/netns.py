"""Thin wrappers over ``ip netns`` (argument lists; errors carry ip's own message)."""
from __future__ import annotations

import subprocess
from typing import Sequence


def run(ns: str, cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` inside network namespace ``ns``; raise with its stderr when ``check`` fails."""
    res = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"in netns {ns}: {' '.join(cmd)}: {res.stderr.strip()}")
    return res


def ip(ns: str, *args: str) -> None:
    """``ip -n NS ARGS`` (raises with ip's message on failure)."""
    res = subprocess.run(["ip", "-n", ns, *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ip -n {ns} {' '.join(args)}: {res.stderr.strip()}")


def add(ns: str) -> None:
    res = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ip netns add {ns}: {res.stderr.strip()}")


def list_names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def pids(ns: str) -> list[int]:
    """Processes whose network namespace is ``ns``."""
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]
