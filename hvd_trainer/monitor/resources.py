"""This process's resource use: resident memory now and at peak, CPU use since the last
sample, and on CUDA the allocated and peak device memory. Read from the kernel's own
counters (no sampling thread), so taking a sample once per epoch costs nothing measurable."""
from __future__ import annotations

import os
import resource
import socket
import sys
import time
from typing import Any, Optional

import torch

_MB = 1024.0 * 1024.0


def rss_bytes() -> int:
    """Resident set size now (Linux: /proc/self/statm; elsewhere the peak stands in)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


class ResourceMeter:
    """``sample()``: memory now and at peak, and the cores this process kept busy (CPU seconds
    over wall seconds, all threads) since the previous sample."""

    def __init__(self, device: Optional[torch.device] = None) -> None:
        self.device = device if device is not None and device.type == "cuda" else None
        self.host = socket.gethostname()
        self._cpu, self._wall = time.process_time(), time.perf_counter()

    def sample(self) -> dict[str, Any]:
        cpu, wall = time.process_time(), time.perf_counter()
        util = (cpu - self._cpu) / max(1e-9, wall - self._wall)
        self._cpu, self._wall = cpu, wall
        rss = rss_bytes()  # the kernel's peak counts pages a little differently: never below now
        out: dict[str, Any] = {"rss_mb": rss / _MB, "peak_rss_mb": max(rss, peak_rss_bytes()) / _MB,
                               "cpu_util": util, "gpu_mb": None, "gpu_peak_mb": None}
        if self.device is not None:  # CUDA only: not exercised on this project's CPU machines
            out["gpu_mb"] = torch.cuda.memory_allocated(self.device) / _MB
            out["gpu_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / _MB
        return out
